"""`sourcelm eval RUN_OR_HF_DIR --tasks T1,T2 [--limit N] [--untrained] [--out DIR]`.

RUN_OR_HF_DIR: a demo-style run folder (its export in RUN/hf, results in RUN/eval/) or an HF model
directory (results in DIR/eval/). `--untrained` scores, instead, a model of the same config freshly
initialised with the run's seed (the baseline that shows what training bought; results in
OUT/untrained/). The model card (`sourcelm card RUN`) shows every result found there.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score an exported model with lm-evaluation-harness (offline tasks packaged)")
    p.add_argument("target", metavar="RUN_OR_HF_DIR", help="a run folder with an hf/ export, or an HF model directory")
    p.add_argument("--tasks", required=True,
                   help="comma-separated task names: sourcelm_pydoc_cloze, sourcelm_udhr_langid, "
                        "sourcelm_fortune_nextline, or a standard harness task whose dataset is available")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="result folder (default: RUN/eval or HF_DIR/eval)")
    p.add_argument("--untrained", action="store_true",
                   help="score a freshly initialised model of the same config instead (the untrained baseline)")
    p.add_argument("--online", action="store_true",
                   help="let the harness download standard tasks' datasets (default: offline)")
    p.set_defaults(func=run_eval)


def resolve_target(target: Path) -> tuple[Path, Path]:
    """(HF model directory, default result folder)."""
    if (target / "hf" / "config.json").is_file():
        return target / "hf", target / "eval"
    return target, target / "eval"


def untrained_copy(hf_dir: Path, out: Path) -> Path:
    """The same config and tokenizer as hf_dir, weights initialised with the training seed (the export's config)."""
    import json

    from sourcelm.config import ModelConfig
    from sourcelm.interop.hf import save_hf
    from sourcelm.model import build_model

    config = json.loads((hf_dir / "config.json").read_text())
    manifest = hf_dir / "manifest.json"
    seed = json.loads(manifest.read_text()).get("config", {}).get("seed", 0) if manifest.is_file() else 0
    save_hf(build_model(ModelConfig.from_hf_dict(config), seed=seed), out, tokenizer_dir=hf_dir)
    return out


def run_eval(args) -> int:
    from sourcelm.eval.harness import evaluate, require_lm_eval, write_results

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise SystemExit("--tasks is empty; name at least one task, e.g. --tasks sourcelm_fortune_nextline")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit {args.limit}: give a positive number of items, or leave it out for all")
    require_lm_eval()
    hf_dir, out = resolve_target(Path(args.target))
    out = Path(args.out) if args.out else out
    with tempfile.TemporaryDirectory(prefix="sourcelm-untrained-") as tmp:
        if args.untrained:
            from sourcelm.eval.harness import check_model_dir

            check_model_dir(hf_dir)
            hf_dir, out = untrained_copy(hf_dir, Path(tmp)), out / "untrained"
        records = evaluate(hf_dir, tasks, args.limit, args.batch_size, args.device, args.online)
    if args.untrained:
        for r in records.values():
            r["model"] = {"dir": None, "untrained": True, "of": str(resolve_target(Path(args.target))[0])}
    for path in write_results(out, records):
        print(f"wrote {path}")
    for task, r in records.items():
        m = r["metrics"]
        print(f"{task}: acc {m.get('acc', float('nan')):.3f} ± {m.get('acc_stderr', float('nan')):.3f}, "
              f"acc_norm {m.get('acc_norm', float('nan')):.3f}, chance {r['chance'] or float('nan'):.3f} "
              f"({r['items']} items)")
    return 0
