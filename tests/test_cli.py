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
