"""Per-source validation loss: each target token counts for the source of its document, the per-source losses
weighted by their token counts sum to the overall validation loss, which is the model's own main loss."""

import json

import numpy as np
import pytest
import torch

from sourcelm.config import load_config
from sourcelm.tokens.indexed import ShardWriter
from sourcelm.tokens.loader import TokenWindows
from sourcelm.tokens.stream import write_doc_sources
from sourcelm.train.loop import Trainer
from sourcelm.train.plot import plot_run

SMALL = [
    "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.q_lora_rank=32",
    "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "model.n_routed_experts=8", "model.num_experts_per_tok=4", "model.n_group=4", "model.topk_group=2",
    "data.seq_len=32", "schedule.steps=4", "schedule.global_batch=4", "schedule.micro_batch=2",
    "schedule.warmup_steps=1", "checkpoint.every=4", "logging.valid_every=2", "logging.valid_batches=2",
    "logging.tensorboard=true", "logging.progress=false", "train.dtype=float32",
]
SOURCES = ["code", "web", "books"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of short documents of three sources, interleaved, so most windows span several sources;
    the second shard has no sidecar (its documents count for the source named after the shard)."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(1)
    docs = {}
    for name, sidecar in (("a", True), ("b", False)):
        prefix, srcs, docs[name] = root / "valid" / name, [], []
        with ShardWriter(prefix) as w:
            for d in range(40):
                ids = rng.integers(3, 512, int(rng.integers(5, 30))).astype(np.uint16).tolist() + [1]
                w.add_document(ids)
                srcs.append(SOURCES[d % 3])
                docs[name].append((len(ids), SOURCES[d % 3] if sidecar else name))
        if sidecar:
            write_doc_sources(prefix, srcs)
    return root / "valid", docs


def test_each_token_counts_for_its_documents_source(shards):
    path, docs = shards
    data = TokenWindows([str(path)], 32, seed=3, split="valid")
    assert data.source_names == ["b", "books", "code", "web"]
    # the stream is shard a then shard b, documents back to back: each token's source, written out
    expect = [data.source_names.index(src) for name in ("a", "b") for n, src in docs[name] for _ in range(n)]
    stream = np.concatenate([data.sets[0].stream.read(0, data.sets[0].stream.num_tokens)])
    for i in range(8):
        w = data.sets[0].window_index(i)
        got = data.batch_sources(i, 1)[0].numpy()
        assert got.tolist() == expect[w * 32: w * 32 + 33]
        assert np.array_equal(data.batch(i, 1)[0].numpy(), stream[w * 32: w * 32 + 33])
    spans = [len(set(data.batch_sources(i, 1)[0].tolist())) for i in range(len(data))]
    assert max(spans) > 1  # windows do cross documents of different sources


def test_per_source_losses_weighted_by_tokens_sum_to_the_validation_loss(shards, tmp_path):
    path, _ = shards
    cfg = load_config("tiny", SMALL + [f"data.train=['{path}']", f"data.valid=['{path}']"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit()
    result = trainer.validate()
    by_loss, by_tokens = result["valid_loss_by_source"], result["valid_tokens_by_source"]
    assert set(by_loss) == {"b", "books", "code", "web"}
    total = sum(by_tokens.values())
    assert total == cfg.logging.valid_batches * cfg.schedule.global_batch * cfg.data.seq_len
    assert sum(by_loss[s] * by_tokens[s] for s in by_loss) / total == pytest.approx(result["valid_loss"], rel=1e-12)
    assert len(set(round(v, 6) for v in by_loss.values())) > 1  # the sources do differ

    # the overall loss is the model's own main loss (the plain logits path) over the same windows
    reference, n = 0.0, 0
    trainer.model.eval()
    with torch.no_grad():
        for start in range(0, cfg.logging.valid_batches * cfg.schedule.global_batch, trainer.quantum):
            batch = trainer.valid_data.batch(start, trainer.quantum)
            out = trainer.model(batch[:, :-1], labels=batch[:, 1:], return_logits=True)
            reference += float(out.main_loss) * batch[:, 1:].numel()
            n += batch[:, 1:].numel()
    assert result["valid_loss"] == pytest.approx(reference / n, rel=1e-5)

    # logged every logging.valid_every steps, to metrics.jsonl, TensorBoard and the loss plot
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r.get("valid_loss") is not None]
    assert [r["step"] for r in logged] == [2, 4]
    assert set(logged[-1]["valid_loss_by_source"]) == set(by_loss)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "valid_by_source.png" in {p.name for p in plot_run(tmp_path)}
