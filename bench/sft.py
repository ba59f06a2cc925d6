"""SFT (issue 20 §3): assistant-token loss on held-out chats before / after `sourcelm sft`, and a sample answer.

    .venv/bin/python bench/sft.py --raw data/cache/corpus --checkpoint RUN/checkpoints/step_N \
        --tokenizer TOKENIZER_DIR --out runs/sft_bench

1. builds a chat set from the Python docs of a `sourcelm corpus fetch` output (RAW/gold/python/**/*.rst.txt, the
   pages' reStructuredText): every section heading followed by a prose paragraph becomes one conversation, the
   heading as the question (as written when it is one, "What does the Python documentation say about X?" when it is
   not), the paragraph, inline markup removed, as the answer. Files and sections in sorted order: deterministic;
2. re-saves the tokenizer (`save_tokenizer`, so it carries the default chat template whatever version trained it)
   and exports the checkpoint with it (`sourcelm export`);
3. runs `sourcelm sft configs/sft.toml --init-from HF --data CHATS` with the LR scaled to the tiny preset (its final
   pretraining LR, 3e-4), 5 % of the chats held out by hash; the run measures the held-out assistant-token loss of
   the base before its first step and after its last;
4. prints both losses and answers one held-out question greedily with the base and with the fine-tuned model.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")
ROLE = re.compile(r":[\w:.-]+:`~?!?([^`<]*?)\s*(?:<[^`>]*>)?`")  # :ref:`text <target>` -> text
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")  # `text <url>`_ -> text
LITERAL = re.compile(r"``([^`]+)``")
MIN_ANSWER, MAX_ANSWER = 80, 600  # characters: a real paragraph, short enough for one seq_len row


def clean(text: str) -> str:
    text = ROLE.sub(r"\1", text)
    text = LINK.sub(r"\1", text)
    text = LITERAL.sub(r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:-2] + ":" if text.endswith("::") else text


def sections(rst: str):
    """(heading, first prose paragraph) of each section of an rst page."""
    lines = rst.splitlines()
    i = 0
    while i + 1 < len(lines):
        title, under = lines[i].strip(), lines[i + 1]
        if title and UNDERLINE.match(under) and len(under.strip()) >= len(title) and not UNDERLINE.match(title):
            j = i + 2
            while j < len(lines) and not lines[j].strip():
                j += 1
            para = []
            while j < len(lines) and lines[j].strip() and not lines[j].startswith((" ", "\t", "..", ":")):
                if j + 1 < len(lines) and UNDERLINE.match(lines[j + 1]):
                    break  # the next heading
                para.append(lines[j])
                j += 1
            if para:
                yield clean(title), clean(" ".join(para))
            i = j
        else:
            i += 1


def build_chats(raw: Path, out: Path) -> int:
    convs = []
    for page in sorted((raw / "gold" / "python").rglob("*.rst.txt")):
        for heading, answer in sections(page.read_text(encoding="utf-8")):
            if not (MIN_ANSWER <= len(answer) <= MAX_ANSWER) or UNDERLINE.match(heading):
                continue
            question = heading if heading.endswith("?") else f"What does the Python documentation say about {heading}?"
            convs.append({"messages": [{"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}]})
    out.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    return len(convs)


def sourcelm(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sourcelm", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def answer(model_dir: Path, question: str, max_new_tokens: int = 60) -> str:
    import torch
    from transformers import AutoTokenizer

    from sourcelm.infer.generate import generate
    from sourcelm.interop.hf import load_hf

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    model = load_hf(model_dir, dtype=torch.float32)
    out = generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True, help="a `sourcelm corpus fetch` output (its gold/python/ is read)")
    ap.add_argument("--checkpoint", required=True, help="a training checkpoint of the base model")
    ap.add_argument("--tokenizer", required=True, help="the tokenizer the base was trained with")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chats = out / "chats.jsonl"
    print(f"chat set: {build_chats(Path(args.raw), chats)} conversations -> {chats}")

    from sourcelm.tokens.tokenizer import load_tokenizer, save_tokenizer

    save_tokenizer(load_tokenizer(args.tokenizer), out / "tokenizer")
    sourcelm("export", args.checkpoint, "--hf", str(out / "hf"), "--tokenizer", str(out / "tokenizer"))
    run = out / "sft"
    seconds = sourcelm("sft", "configs/sft.toml", "--init-from", str(out / "hf"), "--data", str(chats),
                       "--run-dir", str(run), "--no-resume", "optim.lr=3e-4", "optim.min_lr=3e-5",
                       f"schedule.steps={args.steps}", "schedule.global_batch=8", "schedule.micro_batch=4",
                       "schedule.warmup_steps=5", "data.seq_len=192", f"logging.valid_every={args.steps}",
                       f"checkpoint.every={args.steps}", "logging.valid_batches=100", "logging.progress=false",
                       "logging.tensorboard=false")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before = next(r for r in records if r.get("kind") == "base")
    after = [r for r in records if r.get("valid_loss") is not None and r.get("kind") != "base"][-1]
    report = json.loads((run / "sft_data" / "report.json").read_text())
    print(f"sft data: {report['conversations']} conversations, {report['assistant_tokens']} assistant tokens, "
          f"{report['truncated']} cut, skipped {report['skipped']}")
    print(f"{args.steps} steps in {seconds:.0f} s")
    print(f"held-out assistant-token loss over {before['valid_tokens']} tokens: before {before['valid_loss']:.4f}, "
          f"after {after['valid_loss']:.4f}")
    sourcelm("export", str(run / "checkpoints" / f"step_{args.steps:06d}"), "--hf", str(out / "hf_sft"))

    from sourcelm.tokens.chat import ChatRenderer
    from sourcelm.tokens.stream import in_valid_split

    held_out = [line for line in chats.read_bytes().splitlines() if in_valid_split(line, 0.05)]
    question = json.loads(held_out[0])["messages"][0]["content"]
    print("template:", repr(ChatRenderer(out / "hf_sft").render([{"role": "user", "content": question}], True)))
    print(f"held-out question: {question}")
    print(f"base answer:       {answer(out / 'hf', question)!r}")
    print(f"fine-tuned answer: {answer(out / 'hf_sft', question)!r}")


if __name__ == "__main__":
    main()
