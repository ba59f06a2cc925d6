"""The demo's curation keeps the offline tasks' texts out of the training data: a task passage planted in a
training document gets that document dropped as contaminated, its neighbours pass."""

import json

import zstandard

from sourcelm.cli import main
from sourcelm.eval.build_tasks import TASK_DATA

CLEAN = ("The package manager resolves the dependencies of every package before it installs anything, and it "
         "records each file it writes so that a later removal can take the files away again. Administrators "
         "often read the changelog of a package before an upgrade, because a new version may change a default "
         "setting that a running service relies on. The documentation explains each option in a separate "
         "section, with an example of the configuration file and the commands that apply it.")


def _read(folder):
    out = []
    for f in sorted(folder.glob("*.jsonl.zst")):
        text = zstandard.ZstdDecompressor().stream_reader(f.open("rb")).read().decode()
        out += [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


def test_curation_drops_a_planted_task_passage(tmp_path):
    docs = []
    for k, name in enumerate(("fortune_nextline", "pydoc_cloze")):
        item = json.loads((TASK_DATA / f"{name}.jsonl").read_text().splitlines()[3])
        docs.append({"id": f"planted-{k}", "source": "web", "text": f"{CLEAN}\n\n{item['text']}\n\n{CLEAN}"})
    docs += [{"id": f"clean-{k}", "source": "web", "text": CLEAN.replace("package", f"package {w}")}
             for k, w in enumerate(("foo", "bar", "baz"))]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "cur"
    assert main(["curate", "demo", "--output", str(out), "--workers", "1", "--input", str(src), "--no-progress"]) == 0
    kept = [d["text"] for d in _read(out / "documents")]
    reasons = [d["reason"] for d in _read(out / "drops")]
    assert reasons.count("decontaminate:contaminated") == 2  # both planted documents, by this step
    assert kept == [docs[2]["text"]]  # the first clean one; the other two are near-duplicates of it
