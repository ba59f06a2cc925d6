"""Process-level tuning for training: the glibc allocator on the CPU (`keep_freed_cpu_memory`) and Python's garbage
collector between steps (`collect_between_steps`)."""

import gc
import json
import platform
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

MAPPED_BLOCKS_FOR_AN_ACTIVATION = """
import ctypes, sys, torch
from sourcelm.train.device import keep_freed_cpu_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert keep_freed_cpu_memory()
before = libc.mallinfo2().hblks
x = torch.ones(5 << 20)  # 20 MB: an activation-sized block
print(libc.mallinfo2().hblks - before)
"""


def _glibc_with_mallinfo2() -> bool:
    name, version = platform.libc_ver()
    return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not _glibc_with_mallinfo2(),
                    reason="the tuning is glibc's mallopt; the check reads mallinfo2 (2.33+)")
def test_keep_freed_cpu_memory_serves_activations_from_the_heap():
    """By default glibc serves a 20 MB block with its own mmap (unmapped again on free, so the next step
    faults its pages in afresh); tuned, the block comes from the heap, which keeps freed memory."""
    def mapped_blocks(mode):
        out = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS_FOR_AN_ACTIVATION, mode], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[2])
        return int(out.stdout.split()[-1])
    assert mapped_blocks("default") == 1
    assert mapped_blocks("tuned") == 0


class _Node:
    """An object in a reference cycle: only the garbage collector frees it."""

    def __init__(self):
        self.me = self


def test_garbage_is_collected_between_steps_and_only_there(small_config, tmp_path):
    """With train.gc_every = 1 (the default) no collection runs inside a step: each step ends with a collection of
    the young generations, a checkpoint's step with a full one, and what a step left in a reference cycle is freed;
    afterwards the collector is as it was. With 0, Python's automatic collector runs, and the losses are the same."""
    from sourcelm.train.loop import Trainer

    generations, cycles = [], []

    def on_collection(phase, info):
        if phase == "start":
            generations.append(info["generation"])

    def train(name, *overrides):
        trainer = Trainer(small_config("schedule.steps=5", "checkpoint.every=2", *overrides), tmp_path / name,
                          progress=False)
        step = trainer.train_step

        def step_leaving_a_cycle():
            cycles.append(weakref.ref(_Node()))
            return step()

        trainer.train_step = step_leaving_a_cycle
        generations.clear()
        gc.callbacks.append(on_collection)
        try:
            trainer.fit()
        finally:
            gc.callbacks.remove(on_collection)
        return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    managed = train("managed")
    # steps 1-5 (checkpoints after 2, 4 and the last); after the run, Python's automatic ones again
    assert generations[:5] == [1, 2, 1, 2, 2]
    assert [c() for c in cycles] == [None] * 5
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert train("auto", "train.gc_every=0") == managed
    assert 0 in generations  # the automatic collector's young collections
