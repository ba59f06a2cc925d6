import os

import pytest

from sourcelm.cli import build_parser, parse_args


def test_every_command_is_registered():
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert {"corpus", "curate", "audit", "tokenizer", "tokenize", "info", "train", "plot", "export", "generate",
            "verify", "card"} <= commands


def test_overrides_before_and_after_options():
    parser = build_parser()
    args = parse_args(parser, ["train", "tiny", "optim.lr=1e-3", "--run-dir", "r", "--nproc", "4", "parallel.ep=4"])
    assert args.overrides == ["optim.lr=1e-3", "parallel.ep=4"] and args.nproc == 4 and args.run_dir == "r"
    with pytest.raises(SystemExit):
        parse_args(parser, ["train", "tiny", "--run-dir", "r", "--bogus"])
    with pytest.raises(SystemExit):  # only train takes trailing overrides
        parse_args(parser, ["plot", "r", "x=1"])


@pytest.mark.parametrize("caller", [None, "3"])
def test_launch_leaves_the_callers_thread_setting(caller, monkeypatch):
    """The ranks get OMP_NUM_THREADS=1 (torchrun would set it too), the calling process keeps its own: a test or
    notebook that goes on would otherwise start its next subprocesses with one thread, and torch's CPU matmuls
    can give other bits with other thread counts."""
    from sourcelm.parallel import launch

    if caller is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", caller)
    seen = []
    monkeypatch.setattr(launch, "_start_ranks", lambda *a: seen.append(os.environ.get("OMP_NUM_THREADS")) or 0)
    argv = ["train", "tiny", "--run-dir", "r", "--nproc", "2", "parallel.ep=2", "schedule.micro_batch=4"]
    args = parse_args(build_parser(), argv)
    assert launch.launch_local(args) == 0
    assert seen == [caller or "1"] and os.environ.get("OMP_NUM_THREADS") == caller
