"""`python -m sourcelm.eval.build_tasks RAW_DIR`: the offline tasks' data, from the demo corpus.

The JSONL files in `sourcelm/eval/tasks/data/` were made by this module from the corpus that
`sourcelm corpus fetch` builds (package versions pinned in its manifest), and are shipped, so the
tasks need nothing at evaluation time and their SHA-256 are fixed. Each item is
{"context", "choices", "gold", "text"}: the model scores every choice as a continuation of the
context (lm-evaluation-harness `multiple_choice`), and `text` is the passage (context + the right
continuation) that curation decontaminates the training data against. Distractors are other items'
right continuations, so every text a task shows the model is some item's `text`.

  pydoc_cloze       the last word of a paragraph of the Python FAQ and HOWTOs (held out of training
                    by decontamination), against the last words of three other paragraphs
  udhr_langid       the first half of a UDHR article in one of 7 languages; choices: the second half
                    of the same article in that language and in 3 others (language identification)
  fortune_nextline  a multi-line English fortune without its last line; choices: its last line and
                    the last lines of 3 other fortunes

Everything is seeded, so the same corpus gives byte-identical files.
"""

from __future__ import annotations

import argparse
import html
import json
import random
import re
from pathlib import Path

TASK_DATA = Path(__file__).resolve().parent / "tasks" / "data"
N_CHOICES = 4
SEED = 20240823
UDHR_LANGUAGES = {"eng": "eng.html", "deu": "deu_1996.html", "fra": "fra.html", "spa": "spa.html",
                  "ita": "ita.html", "por": "por_PT.html", "nld": "nld.html"}
HELD_OUT_PYDOCS = ("faq", "howto")  # whole sections, so training keeps the rest of the docs intact
_MARKUP = re.compile(r"[`*|<>\[\]_=~^:@#\\]|\.\.|::")


def _item(context: str, right: str, others: list[str], rng: random.Random) -> dict:
    choices = [right, *others]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "gold": choices.index(right), "text": f"{context} {right}"}


def _multiple_choice(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """(context, right continuation) pairs -> items whose distractors are other pairs' right answers
    (distinct from the right one)."""
    answers = [a for _, a in pairs]
    items = []
    for context, right in pairs:
        pool = sorted({a for a in answers if a != right})
        items.append(_item(context, right, rng.sample(pool, N_CHOICES - 1), rng))
    return items


def pydoc_cloze(raw: Path, rng: random.Random, limit: int = 200) -> list[dict]:
    pairs = []
    pages = [p for part in HELD_OUT_PYDOCS for p in sorted((raw / "gold" / "python" / part).glob("*.rst.txt"))]
    for page in pages:
        for block in page.read_text(encoding="utf-8").split("\n\n"):
            if not block or block[0].isspace() or _MARKUP.search(block):
                continue
            words = " ".join(block.split()).split(" ")
            if not 20 <= len(words) <= 80 or not words[-1].endswith(".") or not words[-1][:-1].isalpha():
                continue
            pairs.append((" ".join(words[:-1]), words[-1]))
    return _multiple_choice(rng.sample(pairs, min(limit, len(pairs))), rng)


def _udhr_articles(path: Path) -> dict[int, str]:
    page = path.read_text(encoding="utf-8")
    out = {}
    for number, body in re.findall(r'<article data-number="(\d+)">(.*?)</article>', page, re.S):
        body = re.sub(r"<h2>.*?</h2>", " ", body, flags=re.S)
        out[int(number)] = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())
    return out


def udhr_langid(raw: Path, rng: random.Random) -> list[dict]:
    articles = {lang: _udhr_articles(raw / "udhr" / name) for lang, name in UDHR_LANGUAGES.items()}
    common = sorted(set.intersection(*(set(a) for a in articles.values())))
    items = []
    for number in common:
        halves = {}
        for lang, arts in articles.items():
            words = arts[number].split(" ")
            if len(words) < 16:  # too short to show a language in half of it
                break
            halves[lang] = (" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2:]))
        else:
            for lang in UDHR_LANGUAGES:
                others = rng.sample(sorted(set(UDHR_LANGUAGES) - {lang}), N_CHOICES - 1)
                items.append(_item(halves[lang][0], halves[lang][1], [halves[o][1] for o in others], rng))
    return items


def fortune_nextline(raw: Path, rng: random.Random, limit: int = 200) -> list[dict]:
    pairs = []
    with open(raw / "fortunes" / "fortunes-en.jsonl", encoding="utf-8") as f:
        for line in f:
            lines = [" ".join(x.split()) for x in json.loads(line)["text"].split("\n") if x.strip()]
            # prose only: no attribution lines ("-- Author"), chat logs ("<nick>") or lists
            if not 2 <= len(lines) <= 6 or not all(len(x.split()) >= 4 and x[0].isalnum() for x in lines):
                continue
            if len(" ".join(lines).split()) < 13 or len(" ".join(lines)) > 400:
                continue  # shorter than one 13-gram: decontamination could not see it
            pairs.append(("\n".join(lines[:-1]), lines[-1]))
    return _multiple_choice(rng.sample(pairs, min(limit, len(pairs))), rng)


BUILDERS = {"pydoc_cloze": pydoc_cloze, "udhr_langid": udhr_langid, "fortune_nextline": fortune_nextline}


def build(raw: Path, out: Path = TASK_DATA) -> dict[str, int]:
    """Writes out/NAME.jsonl for every task; returns the item counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, builder in BUILDERS.items():
        items = builder(raw, random.Random(f"{SEED}/{name}"))
        if not items:
            raise SystemExit(f"{raw}: no items for {name}; is it the folder `sourcelm corpus fetch` wrote?")
        (out / f"{name}.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items),
                                           encoding="utf-8")
        counts[name] = len(items)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sourcelm.eval.build_tasks", description=__doc__.splitlines()[0])
    p.add_argument("raw", help="the corpus folder `sourcelm corpus fetch` wrote (e.g. data/raw)")
    p.add_argument("--out", default=str(TASK_DATA), help="where the JSONL files go (default: the packaged tasks)")
    args = p.parse_args(argv)
    print(build(Path(args.raw), Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
