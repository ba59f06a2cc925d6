"""`sourcelm plot RUN_DIR`: the run's curves as PNGs.

loss.png        train loss (total and main), MTP loss, validation loss
valid_by_source.png  with several data sources: the validation loss of each (each target token counted for the
                source of its document), with the overall validation loss
lr.png          learning rate and the MTP weight λ
throughput.png  tokens/s and MFU
expert_load.png per MoE layer, the share of tokens each expert received, over steps (a heat map:
                a balanced router is a flat band at 1/E), plus the max violation per layer
"""

from __future__ import annotations

from pathlib import Path

from sourcelm.train.metrics import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir) if r.get("kind", "train") == "train" and "loss" in r]
    if not records:
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl has no training records")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    steps = np.array([r["step"] for r in records])
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="train (total)", lw=1)
    ax.plot(steps, [r["main_loss"] for r in records], label="train (main)", lw=1)
    ax.plot(steps, [r["mtp_loss"] for r in records], label="MTP", lw=1, alpha=0.8)
    valid = [(r["step"], r["valid_loss"]) for r in records if r.get("valid_loss") is not None]
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation", ms=4)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss.png")

    by_source = [r for r in records if r.get("valid_loss_by_source")]
    if len({n for r in by_source for n in r["valid_loss_by_source"]}) > 1:  # one source: loss.png says it all
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in sorted({n for r in by_source for n in r["valid_loss_by_source"]}):
            points = [(r["step"], r["valid_loss_by_source"][name]) for r in by_source
                      if name in r["valid_loss_by_source"]]
            ax.plot(*zip(*points), "o-", label=name, ms=3, lw=1)
        ax.plot([r["step"] for r in by_source], [r["valid_loss"] for r in by_source], "k--", label="all sources",
                lw=1.5)
        ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="Validation loss per source")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        save(fig, "valid_by_source.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["lr"] for r in records], label="learning rate")
    ax.set(xlabel="step", ylabel="LR", title="Schedules")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["mtp_weight"] for r in records], color="tab:orange", ls="--", label="MTP weight λ")
    ax2.set_ylabel("λ")
    fig.legend(loc="upper right")
    save(fig, "lr.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["tokens_per_s"] for r in records], lw=1)
    ax.set(xlabel="step", ylabel="tokens/s", title="Throughput")
    ax2 = ax.twinx()
    ax2.plot(steps, [100 * r["mfu"] for r in records], color="tab:green", lw=1, alpha=0.7)
    ax2.set_ylabel("MFU (%)")
    save(fig, "throughput.png")

    loads = [r for r in records if "expert_load" in r]
    if loads:
        load = np.array([r["expert_load"] for r in loads], dtype=float)  # [S, L, E]
        share = load / load.sum(axis=2, keepdims=True).clip(min=1)
        n_layers = share.shape[1]
        fig, axes = plt.subplots(n_layers + 1, 1, figsize=(8, 1.8 * n_layers + 2.5), squeeze=False)
        for layer in range(n_layers):
            ax = axes[layer, 0]
            im = ax.imshow(share[:, layer, :].T, aspect="auto", cmap="viridis", interpolation="nearest",
                           extent=[loads[0]["step"], loads[-1]["step"], share.shape[2] - 0.5, -0.5])
            ax.set_ylabel(f"MoE {layer}\nexpert")
            fig.colorbar(im, ax=ax, label="token share")
        ax = axes[n_layers, 0]
        viol = np.array([r["max_violation"] for r in loads])
        for layer in range(n_layers):
            ax.plot([r["step"] for r in loads], viol[:, layer], lw=1, label=f"MoE {layer}")
        ax.set(xlabel="step", ylabel="max load / mean − 1")
        ax.legend(fontsize=7, ncol=4)
        fig.suptitle("Expert load per layer")
        save(fig, "expert_load.png")
    return written
