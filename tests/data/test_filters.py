"""Filters and mappers: each rule fires on a document built to break it and only then; the
vectorised repetition filter equals a plain reference implementation of the Gopher rules."""

import collections
import random

import pytest

from sourcelm.data.pipeline.document import Document
from sourcelm.data.steps import textutil
from sourcelm.data.steps.c4 import C4Quality, FineWebQuality
from sourcelm.data.steps.gopher import GopherQuality, GopherRepetition
from sourcelm.data.steps.pii import PII
from sourcelm.data.steps.sampling import Limit, Sample
from sourcelm.data.steps.url_filter import URLFilter
from tests.data.warc_fixtures import ENGLISH

PROSE = " ".join(ENGLISH)


def doc(text, url=None):
    return Document(id="x", text=text, source="t", url=url)


def verdict(step, text, url=None):
    r = step.process(doc(text, url))
    return r if isinstance(r, str) else "keep"


def test_tokens():
    # the expected splits are spaCy 3.8's English tokenizer's (see test_tokens_equal_spacy)
    assert textutil.tokens("well-known, isn't it... 3.14 http://a.b/c?d=1.") == [
        "well", "-", "known", ",", "is", "n't", "it", "...", "3.14", "http://a.b", "/", "c?d=1", "."]
    assert textutil.tokens("see http://example.com/a.b). e.g., /etc/apt/sources.list") == [
        "see", "http://example.com/a.b", ")", ".", "e.g.", ",", "/etc", "/", "apt", "/", "sources.list"]
    assert textutil.tokens("def main(): ls -h --help x=1 1-2 a-1 1-a :) it's Python's") == [
        "def", "main", "(", "):", "ls", "-h", "--help", "x=1", "1", "-", "2", "a-1", "1", "-", "a", ":)",
        "it", "'s", "Python", "'s"]
    assert textutil.tokens("self.run(x, y) __init__ foo_bar") == [
        "self.run(x", ",", "y", ")", "_", "_", "init", "_", "_", "foo_bar"]
    toks = textutil.tokens("# 12 ab !")
    assert textutil.non_symbol_words(toks) == ["12", "ab"]
    assert textutil.count_symbol_tokens(toks) == 2 and textutil.count_tokens_without_letter(toks) == 3


TRICKY = [
    "I can't believe it's 10am, Dr. Smith's U.S. office (N.Y.) said: \"don't\" -- wasn't it?",
    "Run `pip install -U foo==1.2.3` or see https://docs.python.org/3/library/os.path.html#os.path.join.",
    "if x[i:j] != y: return f(a, *args, **kw)  # 3.5-4 km/h, 5km, $10, 20%, +3 vs +x, C++ and/or w/o",
    "mount /dev/sda1 /mnt; echo $HOME > ~/.bashrc 2>&1 && cd ../src/main.c:12:3 -- 127.0.0.1:8000/x",
    "Wait... what?! «Quoted» „text“ — dash–dash 'single' ‘curly’ it’s y'all gonna 1a.m. 25°C. :-) <3",
    "lambda x: x**2; a<b>c; foo.Bar, lower.Upper; 1,000,000; 3*4^2; a--b; éclair-à-la-crème; ½ ² ©2024",
]


def test_special_cases_spell_their_text():
    from sourcelm.data.steps.english_rules import SPECIAL_CASES

    assert SPECIAL_CASES["don't"] == ("do", "n't") and SPECIAL_CASES["e.g."] == ("e.g.",)
    assert all("".join(v) == k for k, v in SPECIAL_CASES.items())


def test_tokens_equal_spacy():
    """The splitter is spaCy's English tokenizer written without spaCy: equal token lists on
    prose, code, paths, URLs, contractions, abbreviations and emoticons."""
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    for text in TRICKY + [PROSE]:
        expected = [t.text for t in nlp(text) if t.text.strip()]
        assert textutil.tokens(text) == expected, text


def test_gopher_quality_each_rule():
    g = GopherQuality()
    assert verdict(g, PROSE) == "keep"
    assert verdict(g, "the cat and the dog " * 5) == "too_few_words"
    assert verdict(g, "the and of to " + "a b c d e f g " * 20) == "short_mean_word_length"
    assert verdict(g, "the and of " + "incomprehensibilities " * 60) == "long_mean_word_length"
    assert verdict(g, PROSE + " #tag" * 20) == "too_many_hashes"
    assert verdict(g, PROSE + " wait..." * 20) == "too_many_ellipses"
    bullets = "\n".join(f"- the item {i} with words and more words here" for i in range(30))
    assert verdict(g, bullets) == "too_many_bullet_lines"
    ellipsis = "\n".join(f"the line {i} with words and more words here…" for i in range(30))
    assert verdict(g, ellipsis) == "too_many_ellipsis_lines"
    numbers = PROSE + " " + " ".join(str(i) for i in range(200))
    assert verdict(g, numbers) == "few_alphabetic_words"
    no_stop = "Farmers grow wheat near rivers while visitors walk along green banks. " * 8
    assert verdict(g, no_stop) == "few_stop_words"
    assert verdict(g, no_stop + " the end and") == "keep"


def reference_repetition(text, top=((2, .2), (3, .18), (4, .16)), dup=((5, .15), (6, .14), (7, .13), (8, .12),
                                                                     (9, .11), (10, .10))):
    """The Gopher repetition rules written plainly (strings, Counter, the skip-ahead scan)."""
    import re

    paras = re.split(r"\n{2,}", text.strip())
    def dups(xs):
        seen, n, c = set(), 0, 0
        for x in xs:
            if x in seen:
                n, c = n + 1, c + len(x)
            seen.add(x)
        return n, c
    n, c = dups(paras)
    if n / len(paras) > .3:
        return "dup_para_frac"
    if c / len(text) > .2:
        return "dup_para_char_frac"
    lines = re.split("\n+", text)
    n, c = dups(lines)
    if n / len(lines) > .3:
        return "dup_line_frac"
    if c / len(text) > .2:
        return "dup_line_char_frac"
    words = textutil.tokens(text)
    checks = sorted([(n, f, "top") for n, f in top] + [(n, f, "dup") for n, f in dup])
    for n, f, kind in checks:
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if not grams:
            continue
        if kind == "top":
            counts = collections.Counter(grams)
            best = max(counts.values())
            g = next(g for g in grams if counts[g] == best)
            if (len(" ".join(g)) * best) / len(text) > f:
                return f"top_{n}_gram"
        else:
            seen, chars, i = set(), 0, 0
            while i < len(words) - n + 1:
                g = grams[i]
                if g in seen:
                    chars += sum(map(len, g))
                    i += n
                else:
                    seen.add(g)
                    i += 1
            if chars / len(text) > f:
                return f"duplicated_{n}_grams"
    return "keep"


def test_gopher_repetition_equals_reference_on_random_documents():
    rng = random.Random(0)
    vocab = [w for s in ENGLISH for w in s.split()]
    rep = GopherRepetition()
    seen = collections.Counter()
    for _ in range(400):
        words = [rng.choice(vocab[: rng.randint(5, len(vocab))]) for _ in range(rng.randint(5, 300))]
        if rng.random() < 0.5:  # paste a repeated span
            a = rng.randrange(len(words))
            span = words[a:a + rng.randint(3, 30)]
            words[rng.randrange(len(words)):0] = span * rng.randint(1, 4)
        lines, i = [], 0
        while i < len(words):
            k = rng.randint(3, 25)
            lines.append(" ".join(words[i:i + k]))
            i += k
        if rng.random() < 0.3:
            lines += rng.sample(lines, min(len(lines), rng.randint(1, 4)))
        text = ("\n\n" if rng.random() < 0.3 else "\n").join(lines)
        expected = reference_repetition(text)
        assert verdict(rep, text) == expected, text
        seen[expected.split("_")[0]] += 1
    assert len(seen) >= 4  # the random documents exercise keep, top, duplicated and line rules


def test_gopher_repetition_examples():
    rep = GopherRepetition()
    assert verdict(rep, PROSE) == "keep"
    assert verdict(rep, "\n\n".join([ENGLISH[0], ENGLISH[1], ENGLISH[0], ENGLISH[0]])) == "dup_para_frac"
    assert verdict(rep, "\n".join([ENGLISH[0]] * 2 + ENGLISH[1:] * 1 + [ENGLISH[0]] * 2)) == "dup_line_frac"
    assert verdict(rep, "") == "empty"


def test_c4_tfds_default_and_datatrove_preset():
    four_word = "\n".join(["This line has four.", "Another one has four."] * 3)
    five_word = "\n".join([f"This line number {i} has six words." for i in range(3)])
    tfds, dt = C4Quality(), C4Quality(preset="datatrove")
    assert verdict(tfds, five_word) == "keep"  # 3 sentences of >= 5 words
    assert verdict(dt, five_word) == "too_few_sentences"  # datatrove wants 5 sentences
    assert verdict(dt, four_word + "\n" + five_word) == "keep"  # 9 lines of >= 3 words
    assert verdict(tfds, four_word) == "too_few_sentences"  # 4-word lines dropped under TFDS
    assert verdict(tfds, five_word + "\nThe text says lorem ipsum dolor sit amet.") == "lorem_ipsum"
    assert verdict(tfds, five_word + "\nA function body { goes here } and more.") == "curly_bracket"
    d = doc("Menu\nHome | About\n" + five_word + "\nPlease enable JavaScript to view this site ok.\n"
            "See our privacy policy for all the details.\nCitation here[1] with five words more.\nTrailing...")
    out = tfds.process(d)
    assert out.text.splitlines() == [f"This line number {i} has six words." for i in range(3)] + [
        "Citation here with five words more."]
    assert tfds.counters["lines_javascript"] == 1 and tfds.counters["lines_policy"] == 1
    assert C4Quality(min_sentences=1, max_page_chars=50).process(doc(five_word)) == "page_too_long"


def test_c4_badwords_file(tmp_path):
    (tmp_path / "bad.txt").write_text("darn\nheck it\n")
    c4 = C4Quality(badwords_file=str(tmp_path / "bad.txt"), min_sentences=1)
    assert verdict(c4, "Oh heck it all went wrong today.") == "bad_words"
    assert verdict(c4, "The darning needle was sharp enough.") == "keep"  # whole words only


def test_fineweb_rules_and_presets():
    fw = FineWebQuality()
    assert verdict(fw, PROSE) == "keep"
    assert verdict(fw, "\n".join(f"Menu item number {i} without end" for i in range(20))) == "line_punct_ratio"
    assert verdict(fw, "\n".join(["Short line."] * 3 + [ENGLISH[0]])) in ("short_line_ratio", "char_dup_ratio")
    assert verdict(fw, "\n".join([f"Item {i}." for i in range(10)])) == "short_line_ratio"
    dup = "\n".join(ENGLISH + [ENGLISH[0][:60] + "."] * 2)
    assert verdict(fw, dup) == "char_dup_ratio"
    assert verdict(FineWebQuality(preset="fineweb_blog"), dup) == "keep"  # 0.1 is looser than 0.01
    listy = "\n".join(["A b."] * 1 + [f"Word{i} and." for i in range(40)])
    assert verdict(FineWebQuality(short_line_thr=1.0), listy) == "list_ratio"
    with pytest.raises(ValueError):
        FineWebQuality(preset="nope")


def test_pii_replaces_and_counts():
    p = PII()
    d = p.process(doc("Mail jane.doe+x@mail.example.co.uk or 8.8.8.8, not v1.2.3.4 nor 999.1.1.1; "
                      "v6 2001:db8::8a2e:370:7334 and time 10:30:00."))
    assert d.text == ("Mail <EMAIL> or <IP>, not v1.2.3.4 nor 999.1.1.1; v6 <IP> and time 10:30:00.")
    assert p.counters == {"emails_replaced": 1, "ips_replaced": 2}


def test_url_filter(tmp_path):
    (tmp_path / "domains.txt").write_text("# comment\nbad.example\n")
    (tmp_path / "urls.txt").write_text("https://ok.example/exact-page\n")
    (tmp_path / "words.txt").write_text("casino\n")
    u = URLFilter(domain_files=[str(tmp_path / "domains.txt")], url_files=[str(tmp_path / "urls.txt")],
                  banned_words_files=[str(tmp_path / "words.txt")])
    assert verdict(u, "t", "https://www.sub.bad.example/page") == "blocked_domain"
    assert verdict(u, "t", "https://notbad.example/page") == "keep"
    assert verdict(u, "t", "https://ok.example/exact-page") == "blocked_url"
    assert verdict(u, "t", "https://ok.example/best-casino-online") == "banned_word_in_url"
    assert verdict(u, "t", "https://ok.example/casinos") == "keep"
    assert verdict(u, "t", "https://xvideos.com/") == "blocked_domain"  # the shipped default list
    assert verdict(URLFilter(use_default=False), "t", "https://xvideos.com/") == "keep"
    assert verdict(u, "t", None) == "keep" and u.counters["no_url"] == 1


def test_sample_is_deterministic_and_limit_counts():
    docs = [Document(id=f"id{i}", text="t", source="s") for i in range(2000)]
    a = [isinstance(Sample(0.25, seed=1).process(d), Document) for d in docs]
    b = [isinstance(Sample(0.25, seed=1).process(d), Document) for d in docs]
    c = [isinstance(Sample(0.25, seed=2).process(d), Document) for d in docs]
    assert a == b and a != c and 400 < sum(a) < 600
    lim = Limit(per_task=3)
    assert [isinstance(lim.process(d), Document) for d in docs[:5]] == [True, True, True, False, False]
