import hashlib

import numpy as np
import pytest

from sourcelm.config import load_config
from sourcelm.kernels import build
from sourcelm.tokens.indexed import ShardWriter

# a model small enough to train a few steps in seconds, with every DeepSeek-V3 feature on
SMALL = [
    "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.q_lora_rank=32",
    "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "model.n_routed_experts=8", "model.num_experts_per_tok=4", "model.n_group=4", "model.topk_group=2",
    "data.seq_len=32", "schedule.steps=6", "schedule.global_batch=4", "schedule.micro_batch=2",
    "schedule.warmup_steps=2", "checkpoint.every=2", "checkpoint.keep=5", "logging.valid_every=3",
    "logging.valid_batches=1", "logging.tensorboard=false", "logging.progress=false", "logging.plots=false",
    "optim.lr=3e-3",
]


@pytest.fixture(scope="session")
def token_dirs(tmp_path_factory):
    """Train and valid shards of 'documents' with learnable structure (arithmetic runs), vocab 512."""
    root = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    for split, n_docs in (("train", 60), ("valid", 10)):
        with ShardWriter(root / split / "shard_00000") as w:
            for _ in range(n_docs):
                start, stride, length = rng.integers(2, 500), rng.integers(1, 4), rng.integers(20, 120)
                w.add_document(((start + stride * np.arange(length)) % 510 + 2).astype(np.uint16).tolist() + [1])
    return root / "train", root / "valid"


@pytest.fixture
def small_config(token_dirs):
    def make(*extra):
        train, valid = token_dirs
        return load_config("tiny", SMALL + [f"data.train=['{train}']", f"data.valid=['{valid}']", *extra])
    return make


@pytest.fixture(scope="session")
def small_args(token_dirs):
    """The same run as `small_config`, as command-line arguments."""
    train, valid = token_dirs
    return ["tiny", *SMALL, f"data.train=['{train}']", f"data.valid=['{valid}']"]


@pytest.fixture
def digest():
    return weights_digest


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def assert_same_run(reference: list[dict], got: list[dict], name: str, routes_per_token: int) -> None:
    """Two layouts' step records agree as fp32 allows.

    Layouts agree to the last bits, not bit for bit: they sum gradients, norms and the experts' rows in other
    orders. Where a token's routing is a near tie, those bits can send it to other experts in one layout, and from
    that step on the runs part as two trajectories do. So every step up to the first whose expert counts differ
    agrees: loss within 1e-5, gradient norm 1e-4, expert counts exactly, expert biases 1e-5; at that step the
    counts may differ in one layer by one token's routes (a near tie's mark, not a wrong count), the loss still
    within 1e-5; later steps' losses within 1e-3. Which step parts, if any, depends on the CPU's kernels: the
    PP 2 x EP 2 run parts at step 13 of 20 on an AMD EPYC, while CI's machine passed a check without parting."""
    assert len(got) == len(reference) > 0, name
    parted = False
    for a, b in zip(reference, got):
        where = (name, a["step"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3 if parted else 1e-5), where
        if parted:
            continue
        if b.get("expert_load") != a.get("expert_load"):  # a skipped step has none
            layers = [(x, y) for x, y in zip(a["expert_load"], b["expert_load"]) if x != y]
            moved = sum(abs(i - j) for i, j in zip(*layers[0]))
            assert len(layers) == 1 and moved <= 2 * routes_per_token, (where, layers)
            parted = True
            continue
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), where
        if "bias_norm" in a:
            assert b["bias_norm"] == pytest.approx(a["bias_norm"], rel=1e-5), where
        if "valid_loss" in a:
            assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-5), where


@pytest.fixture(params=["native", "torch"])
def update_path(request, monkeypatch):
    """Every FlatAdamW test runs on both update paths: the CPU kernel and torch's fused AdamW (other devices)."""
    if request.param == "native" and not build.available():
        pytest.skip("no C compiler: the native kernels do not build")
    if request.param == "torch":
        monkeypatch.setenv("SOURCELM_KERNELS", "torch")
    return request.param
