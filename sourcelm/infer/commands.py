"""`sourcelm generate MODEL_DIR --prompt TEXT | --prompt-ids 1,2,3 [--max-new-tokens N --temperature T
--top-p P --seed S]` on an HF-format model directory (e.g. the output of `sourcelm export`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from an HF-format DeepSeek-V3 model directory")
    p.add_argument("model_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in MODEL_DIR)")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import torch

    from sourcelm.infer.generate import generate
    from sourcelm.interop.hf import load_hf

    model_dir = Path(args.model_dir)
    tokenizer = None
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"{model_dir}: no tokenizer.json; pass --prompt-ids instead of --prompt")
        ids = tokenizer.encode(args.prompt).ids
    else:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--prompt-ids {args.prompt_ids!r}: give comma-separated integers") from None
    if not ids:
        raise SystemExit("the prompt is empty")
    if not 0 < args.top_p <= 1:
        raise SystemExit(f"--top-p {args.top_p}: give a probability mass in (0, 1]")
    model = load_hf(model_dir, dtype=getattr(torch, args.dtype))
    if min(ids) < 0 or max(ids) >= model.config.vocab_size:
        raise SystemExit(f"--prompt-ids: every id must be in 0..{model.config.vocab_size - 1} (the vocabulary)")
    out = generate(model, torch.tensor([ids]), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, eos_token_id=model.config.eos_token_id)
    new = out[0, len(ids):].tolist()
    if tokenizer is not None:
        print(args.prompt + tokenizer.decode(new) if args.prompt is not None else tokenizer.decode(ids + new))
    else:
        print(",".join(map(str, ids + new)))
    return 0
