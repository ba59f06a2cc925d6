"""Parity of node-limited routing with transformers over the group grid, as a table for bench/RESULTS_routing.md.

For every cell (n_group in 1/2/4, topk_group in 1..n_group, K from 1 to the kept experts; 8 experts, fp32, CPU,
nonzero correction biases) it prints the worst relative logit error max|ours - theirs| / max|theirs| of
  * ours -> save_hf -> transformers' DeepseekV3ForCausalLM,
  * a transformers model -> save_pretrained -> load_hf -> ours,
  * the second direction's weights routed with the report's K/M count instead of the released top 2, where
    that count is a whole number that differs from 2 and a group is dropped (the rule before issue 20).
The measurements are the ones tests/interop/test_hf_group_routing.py asserts; this script reuses its code.

    .venv/bin/python bench/routing_parity.py     # a few seconds on 2 cores (the table goes to stdout)
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _grid_module():
    path = ROOT / "tests" / "interop" / "test_hf_group_routing.py"
    spec = importlib.util.spec_from_file_location("hf_group_routing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    grid = _grid_module()
    grid.transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    print("| n_group | topk_group | K | ours → transformers | transformers → ours | K/M count instead of 2 |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (n_group, topk_group) in enumerate(grid.GROUP_SETTINGS):
            for cell in grid.grid_cells(n_group, topk_group):
                cfg = grid.grid_config(*cell)
                reading = grid.report_reading(*cell)
                out = grid.ours_to_transformers_error(cfg, Path(tmp) / f"out{i}-{cell[2]}")
                back, other = grid.transformers_to_ours_errors(cfg, Path(tmp) / f"in{i}-{cell[2]}", reading=reading)
                worst = max(worst, out, back)
                shown = "" if other is None else f"{other:.2e} (count {reading})"
                print(f"| {n_group} | {topk_group} | {cell[2]} | {out:.2e} | {back:.2e} | {shown} |")
    print(f"\nworst of both directions: {worst:.2e} (tolerance {grid.TOLERANCE:.0e}); "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
