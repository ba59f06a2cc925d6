"""Conversations -> an SFT dataset: token ids and which of them the assistant wrote.

Input: JSONL, one conversation a line, `{"messages": [{"role": ..., "content": ...}, ...]}` (the
OpenAI / Hugging Face chat format). Each is rendered with the tokenizer's own chat template
(`apply_chat_template` of the HF tokenizer in the given directory; the project's trained tokenizer
carries `tokenizer.CHAT_TEMPLATE`) and tokenised once, with character offsets.

Which tokens are the assistant's: for the assistant message i, its span of the rendered text runs
from the end of `render(messages[:i], add_generation_prompt=True)` (the prompt up to where the
answer starts) to the end of `render(messages[:i + 1])` (its content and whatever the template
closes the turn with, e.g. the end-of-text token, so the model learns to stop). This works for any
template that renders a conversation as a growing prefix; one that renders earlier turns differently
once later ones follow cannot be split so, and such a conversation is skipped with that reason. A
token is the assistant's when its first character is in such a span.

Bad input: a line that is not a JSON object with a `messages` list of {role: str, content: str},
that has no non-empty assistant message, or whose assistant tokens all fall past `max_tokens`, is
skipped and counted by reason in report.json (with the first line numbers of each). A template
that renders no assistant token for a conversation that has an assistant answer is an error naming
the template: the loss would be empty. Conversations longer than `max_tokens` are cut there (counted).

Output, a directory: `train.safetensors` and `valid.safetensors` (`tokens` int32 [N], `assistant`
uint8 [N], `offsets` int64 [conversations + 1]: conversation c is tokens[offsets[c]:offsets[c+1]]),
report.json, and manifest.json pinning the chat file and the tokenizer files by SHA-256. A
conversation goes to the held-out split by a hash of its line (`in_valid_split`), so the split does
not depend on the seed or on the other lines.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from sourcelm.artifacts import atomic_write_bytes, sha256_file, write_manifest
from sourcelm.tokens.stream import in_valid_split

SPLITS = ("train", "valid")
REPORT = "report.json"
EXAMPLES_PER_REASON = 20  # line numbers kept per skip reason in the report
# the files that make a HF tokenizer and its template, pinned by the manifest
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")


class TemplateError(ValueError):
    """The chat template cannot give an SFT loss (it renders no assistant token)."""


class ChatRenderer:
    """A tokenizer directory's chat template: conversation -> (token ids, assistant flags)."""

    def __init__(self, tokenizer_dir: str | Path):
        from transformers import AutoTokenizer

        self.dir = Path(tokenizer_dir)
        self.tok = AutoTokenizer.from_pretrained(str(self.dir))
        self.template = self.tok.chat_template
        if not isinstance(self.template, str) or not self.template:
            raise TemplateError(f"{self.dir}: the tokenizer has no chat template (tokenizer_config.json "
                                f"'chat_template' or chat_template.jinja); add one, e.g. the project's default "
                                f"sourcelm.tokens.tokenizer.CHAT_TEMPLATE")
        self.template_sha256 = hashlib.sha256(self.template.encode()).hexdigest()
        self.pad_id = next(i for i in (self.tok.pad_token_id, self.tok.eos_token_id, 0) if i is not None)

    @property
    def name(self) -> str:
        return f"the chat template of {self.dir} (sha256 {self.template_sha256[:12]})"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]] | None:
        """(the rendered conversation, [start, end) character spans of the assistant turns), or None when the
        template does not render the conversation as a growing prefix (module doc)."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(prompt) and full.startswith(upto)):
                return None
            if len(upto) > len(prompt):
                spans.append((len(prompt), len(upto)))
        return full, spans

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
        """(int64 token ids, bool per token: the assistant's), or None as `assistant_spans`."""
        rendered = self.assistant_spans(messages)
        if rendered is None:
            return None
        text, spans = rendered
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        starts = np.array([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
        mine = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            mine |= (starts >= a) & (starts < b)
        if not mine.any():
            raise TemplateError(f"{self.name} renders no assistant token for a conversation with an assistant "
                                f"answer ({text[:200]!r}...); the SFT loss would be empty. Use a template that "
                                f"renders the assistant messages' content")
        return ids, mine


def parse_conversation(line: bytes) -> tuple[list[dict] | None, str]:
    """(messages, "") or (None, why the line is skipped)."""
    try:
        record = json.loads(line)
    except ValueError:  # UnicodeDecodeError included
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "no 'messages' list"
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return None, "a message without a string 'role' and 'content'"
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return None, "no non-empty assistant message"
    return [{"role": m["role"], "content": m["content"]} for m in messages], ""


def build_chat_dataset(chats: str | Path, tokenizer_dir: str | Path, out: str | Path, max_tokens: int,
                       valid_fraction: float = 0.0) -> dict:
    """Writes the SFT dataset directory (module doc); returns the report. max_tokens: the longest conversation
    kept whole (a training sample is seq_len + 1 tokens)."""
    chats, out = Path(chats), Path(out)
    if not chats.is_file():
        raise FileNotFoundError(f"--data {chats}: no such file; give a JSONL file of {{\"messages\": [...]}} lines")
    renderer = ChatRenderer(tokenizer_dir)
    kept = {s: ([], []) for s in SPLITS}  # split -> (token arrays, flag arrays)
    skipped: Counter = Counter()
    examples: dict[str, list[int]] = {}
    truncated = lines = 0
    with chats.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            lines += 1
            messages, why = parse_conversation(line)
            if messages is not None:
                encoded = renderer.encode(messages)
                if encoded is None:
                    why = "the template renders earlier turns differently once later ones follow"
                else:
                    ids, mine = encoded
                    if len(ids) > max_tokens:
                        ids, mine = ids[:max_tokens], mine[:max_tokens]
                        truncated += 1
                    if not mine[1:].any():  # the first token is never a target
                        why = f"no assistant token within the first {max_tokens} tokens"
            if why:
                skipped[why] += 1
                examples.setdefault(why, [])
                if len(examples[why]) < EXAMPLES_PER_REASON:
                    examples[why].append(number)
                continue
            split = "valid" if in_valid_split(line.rstrip(b"\r\n"), valid_fraction) else "train"
            kept[split][0].append(ids)
            kept[split][1].append(mine)
    if not kept["train"][0]:
        raise ValueError(f"--data {chats}: no usable conversation for training among {lines} lines "
                         f"(skipped: {dict(skipped)}); see the format in sourcelm/tokens/chat.py")
    out.mkdir(parents=True, exist_ok=True)
    outputs = []
    for split, (ids, flags) in kept.items():
        if ids:
            outputs.append(_save_split(out / f"{split}.safetensors", ids, flags))
    report = {"lines": lines, "conversations": {s: len(kept[s][0]) for s in SPLITS},
              "tokens": {s: int(sum(map(len, kept[s][0]))) for s in SPLITS},
              "assistant_tokens": {s: int(sum(int(f.sum()) for f in kept[s][1])) for s in SPLITS},
              "truncated": truncated, "skipped": dict(skipped), "skipped_lines": examples, "max_tokens": max_tokens}
    atomic_write_bytes(out / REPORT, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    tok_files = [renderer.dir / n for n in TOKENIZER_FILES if (renderer.dir / n).is_file()]
    write_manifest(out, "sft_data", outputs=[*outputs, REPORT], inputs=[chats, *tok_files],
                   config={"max_tokens": max_tokens, "valid_fraction": valid_fraction},
                   extra={"chats": str(chats.resolve()), "chats_sha256": sha256_file(chats),
                          "tokenizer_dir": str(renderer.dir.resolve()),
                          "chat_template_sha256": renderer.template_sha256, "pad_id": renderer.pad_id})
    return report


def _save_split(path: Path, ids: list[np.ndarray], flags: list[np.ndarray]) -> Path:
    import torch
    from safetensors.torch import save_file

    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    save_file({"tokens": torch.from_numpy(np.concatenate(ids).astype(np.int32)),
               "assistant": torch.from_numpy(np.concatenate(flags).astype(np.uint8)),
               "offsets": torch.from_numpy(offsets)}, str(path))
    return path


def load_split(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int64, assistant bool, offsets int64) of one split file."""
    from safetensors.numpy import load_file

    t = load_file(str(path))
    return t["tokens"].astype(np.int64), t["assistant"].astype(bool), t["offsets"]
