import json

from sourcelm.train.loop import Trainer
from sourcelm.train.plot import plot_run


def test_metrics_tensorboard_and_plots(small_config, tmp_path):
    cfg = small_config("schedule.steps=3", "logging.tensorboard=true", "logging.valid_every=3")
    Trainer(cfg, tmp_path, progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    meta, steps = records[0], [r for r in records if r.get("kind", "train") == "train"]
    assert meta["kind"] == "meta" and meta["peak_flops"] > 0 and meta["optimizer_state_bytes_per_rank"] > 0
    assert [r["step"] for r in steps] == [1, 2, 3]
    last = steps[-1]
    n_moe = cfg.model.num_hidden_layers - cfg.model.first_k_dense_replace + cfg.model.num_nextn_predict_layers
    assert len(last["expert_load"]) == n_moe and len(last["expert_load"][0]) == cfg.model.n_routed_experts
    # every token of the global batch is routed to K experts in every MoE layer, MTP included
    tokens = cfg.schedule.global_batch * cfg.data.seq_len
    assert sum(last["expert_load"][0]) == tokens * cfg.model.num_experts_per_tok
    assert (sum(last["expert_load"][-1])
            == cfg.schedule.global_batch * (cfg.data.seq_len - 1) * cfg.model.num_experts_per_tok)
    for key in ("max_violation", "load_cv", "bias_norm"):
        assert len(last[key]) == n_moe
    assert 0 < last["mfu"] < 1 and last["tokens_per_s"] > 0 and last["valid_loss"] > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    written = plot_run(tmp_path)
    assert {p.name for p in written} == {"loss.png", "lr.png", "throughput.png", "expert_load.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
