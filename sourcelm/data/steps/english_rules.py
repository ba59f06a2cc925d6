"""The rule tables of the English word splitter in `textutil`: affix and infix patterns, the
strings kept whole or split in a fixed way (special cases), and what counts as a URL.

They state the rules of spaCy 3.x's English tokenizer (the one datatrove's Gopher filters count
words with), so sourcelm's Gopher statistics are comparable with those published with datatrove
and FineWeb, without spaCy at run time. Character classes are taken from Python's Unicode tables
(letters by `str.islower` / `str.isupper`, symbols by category So) instead of spaCy's hand-made
script ranges; the two differ only on scripts spaCy does not list (Thai, Georgian, ...).
"""

from __future__ import annotations

import re
import unicodedata


def _ranges(pred, stop: int) -> str:
    """A regex character-class body with every code point below `stop` for which pred holds."""
    out, start, prev = [], None, None
    for cp in range(stop + 1):
        if cp < stop and pred(chr(cp)):
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            first, last = re.escape(chr(start)), re.escape(chr(prev))
            out.append(first if start == prev else f"{first}-{last}")
            start = None
    return "".join(out)


_BMP = 0x10000
_uncased = _ranges(lambda c: c.isalpha() and not c.islower() and not c.isupper(), _BMP)
LOWER = _ranges(str.islower, _BMP) + _uncased
UPPER = _ranges(str.isupper, _BMP) + _uncased
# dingbats, arrows, box drawing, emoji...: Unicode category So (and the emoji planes beyond the BMP)
ICONS = _ranges(lambda c: unicodedata.category(c) == "So", _BMP) + r"\U0001F000-\U0001FAFF"

PUNCT = ["…", "……", ",", ":", ";", "!", "?", "¿", "؟", "¡", "(", ")", "[", "]", "{", "}", "<", ">",
         "_", "#", "*", "&", "。", "？", "！", "，", "、", "；", "：", "～", "·", "।", "،", "۔", "؛", "٪"]
QUOTES = ["'", '"', "”", "“", "`", "‘", "´", "’", "‚", ",", "„", "»", "«", "「", "」", "『", "』", "（",
          "）", "〔", "〕", "【", "】", "《", "》", "〈", "〉", "〈", "〉", "⟦", "⟧"]
ELLIPSES = [r"\.\.+", "…"]
CURRENCY = r"\$|£|€|¥|฿|US\$|C\$|A\$|﷼|[₠-₿]"
UNITS = ("km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz "
         "m/s km/h kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K % км км² км³ м м² м³ дм дм² "
         "дм³ см см² см³ мм мм² мм³ нм кг г мг м/с км/ч кПа Па мбар Кб КБ кб Мб МБ мб Гб ГБ гб Тб ТБ тб")
HYPHENS = "-|–|—|--|---|——|~"

_esc = [re.escape(p) for p in PUNCT]
_quotes_esc = [re.escape(q) for q in QUOTES]
# characters after which a final period is split off (the class spaCy builds from its
# punctuation and quote lists keeps their separators "|", "(", "?", ":" and ")" in it)
_PERIOD_AFTER = ("0-9" + LOWER + r"%²\-\+" + re.escape("".join(PUNCT) + "".join(QUOTES) + "|(?:)"))
_QUOTE_CHARS = re.escape("".join(QUOTES))

PREFIXES = (["§", "%", "=", "—", "–", r"\+(?![0-9])"] + _esc + ELLIPSES + _quotes_esc
            + CURRENCY.split("|") + [f"[{ICONS}]"])
SUFFIXES = (_esc + ELLIPSES + _quotes_esc + [f"[{ICONS}]", "'s", "'S", "’s", "’S", "—", "–",
                                             r"(?<=[0-9])\+", r"(?<=°[FfCcKk])\.",
                                             rf"(?<=[0-9])(?:{CURRENCY})",
                                             r"(?<=[0-9])(?:" + "|".join(map(re.escape, UNITS.split())) + ")",
                                             rf"(?<=[{_PERIOD_AFTER}])\.",
                                             rf"(?<=[{UPPER}][{UPPER}])\."])
# [^\W\d_] is any letter
INFIXES = ELLIPSES + [f"[{ICONS}]",
                      r"(?<=[0-9])[+\-\*^](?=[0-9-])",
                      rf"(?<=[{LOWER}{_QUOTE_CHARS}])\.(?=[{UPPER}{_QUOTE_CHARS}])",
                      r"(?<=[^\W\d_]),(?=[^\W\d_])",
                      rf"(?<=[^\W_])(?:{HYPHENS})(?=[^\W\d_])",
                      r"(?<=[^\W_])[:<>=/](?=[^\W\d_])"]

PREFIX_RE = re.compile("|".join("^" + p for p in PREFIXES))
SUFFIX_RE = re.compile("|".join(p + "$" for p in SUFFIXES))
INFIX_RE = re.compile("|".join(INFIXES))

# a whole chunk that looks like a URL or a host name ("example.com/a", "sources.list") is one token
_IP = (r"(?!(?:10|127)(?:\.\d{1,3}){3})(?!(?:169\.254|192\.168)(?:\.\d{1,3}){2})"
       r"(?!172\.(?:1[6-9]|2\d|3[0-1])(?:\.\d{1,3}){2})"
       r"(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}"
       r"(?:\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4]))")
_LABEL = r"(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?[A-Za-z0-9\u00a1-\uffff]\."
URL_RE = re.compile(rf"(?:[\w+\-.]{{2,}}://)?(?:\S+(?::\S*)?@)?(?:{_IP}|(?:{_LABEL})+[{LOWER}]{{2,63}})"
                    r"(?::\d{2,5})?(?:[/?#]\S*)?\Z")


# ------------------------------------------------------------------------------------ special cases
def _special_cases() -> dict[str, tuple[str, ...]]:
    """Strings that are split in a fixed way (or kept whole) before any affix rule applies."""
    sp: dict[str, tuple[str, ...]] = {}

    def add(*parts: str) -> None:
        sp["".join(parts)] = parts

    def cased(*parts: str) -> None:  # the lower-case form and the one with a capital first letter
        add(*parts)
        add(parts[0][:1].upper() + parts[0][1:], *parts[1:])

    # contractions, with ' or ’, and without the apostrophe unless that spells another word
    not_without = {"ill", "hell", "shed", "shell", "well", "were", "its", "lets", "whore"}
    groups = [
        ("i", "m ll ll've d d've ve"), ("you", "ll ll've d d've re ve"), ("he", "ll ll've d d've s"),
        ("she", "ll ll've d d've s"), ("it", "ll ll've d d've s"), ("we", "ll ll've d d've re ve"),
        ("they", "ll ll've d d've re ve"), ("that", "d d've ll ll've s"), ("this", "d d've ll ll've s"),
        ("there", "d d've ll ll've re s ve"), ("these", "d d've ll ll've re ve"),
        ("those", "d d've ll ll've re ve"), ("let", "s"),
        *((w, "d d've ll ll've re s ve") for w in ("who", "what", "when", "where", "why", "how")),
        *((v, "n't n't've") for v in ("ca", "did", "does", "do", "had", "may", "need", "ought", "sha", "wo")),
        *((v, "n't n't've 've") for v in ("could", "might", "must", "should", "would")),
        *((v, "n't") for v in ("ai", "are", "dare", "has", "have", "is", "was", "were")),
        ("not", "'ve"),
    ]
    for base, endings in groups:
        for ending in endings.split():
            for apo in ("'", "’"):
                cased(base, *_pieces(ending, apo))
            bare = [p.replace("'", "") for p in _pieces(ending, "'")]
            if (base + "".join(bare)).lower() not in not_without:
                cased(base, *bare)
    for apo in ("'", "’"):
        cased("i", f"{apo}m", "a")
        cased("how", f"{apo}d", f"{apo}y")
        add(f"y{apo}", "all")
        cased(f"c{apo}m", "on")
        for w in ("ma", "o"):
            cased(f"{w}{apo}{'am' if w == 'ma' else 'clock'}")
        cased(f"ol{apo}")
        for w in ("s", "d", "ll", "re", "em", "nuff", "bout", "cause", "cos", "coz", "cuz"):
            add(f"{apo}{w}")
        for w in ("cause", "cos", "coz", "cuz", "s"):
            add(f"{apo}{w.capitalize()}")
        for w in ("doin", "goin", "havin", "lovin", "nothin", "nuthin", "somethin"):
            cased(f"{w}{apo}")
    for w in ("doin", "goin", "havin", "lovin", "nothin", "nuthin", "somethin", "ol"):
        cased(w)
    add("‘s"), add("‘S"), add("em"), add("ll"), add("nuff")
    cased("i", "m", "a"), cased("can", "not"), cased("gon", "na"), cased("got", "ta"), add("y", "all")
    # times of day
    for h in range(1, 13):
        for m in ("am", "pm", "a.m.", "p.m."):
            add(str(h), m)
    for c in "FfCcKk":
        add("°", c, ".")
    # abbreviations kept whole with their period
    for a in ("Adm. Ak. Ala. Apr. Ariz. Ark. Aug. Bros. Calif. Co. Colo. Conn. Corp. D.C. Dec. Del. Dr. "
              "E.G. E.g. Feb. Fla. Ga. Gen. Gov. I.E. I.e. Ia. Id. Ill. Inc. Ind. Jan. Jr. Jul. Jun. Kan. "
              "Kans. Ky. La. Ltd. Mar. Mass. Md. Messrs. Mich. Minn. Miss. Mo. Mont. Mr. Mrs. Ms. Mt. N.C. "
              "N.D. N.H. N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. Ph.D. Prof. Rep. Rev. S.C. "
              "Sen. Sep. Sept. St. Tenn. Va. Wash. Wis. a.m. co. e.g. i.e. p.m. v.s. vs. ä. ö. ü.").split():
        add(a)
    for c in "abcdefghijklmnopqrstuvwxyz":
        add(c + ".")
    # emoticons and other symbol strings kept whole
    for e in (":) :)) :))) :-) :-)) :-))) :( :(( :((( :-( :-(( :-((( :'( :') :'-( :'-) :’( :’) :’-( :’-) "
              ":() :* :-* :-/ :-0 :-3 :-> :-] :-| :-} :/ :0 :1 :3 :> :] :| :} ;) ;-) ;_; (: (; (= (-: "
              "(-; (-8 ): )-: 8) 8-) =( =) =/ =3 =[ =] =| [: [= [-: ]= <3 <33 <333 </3 >.< >.> <.< >:( "
              "^_^ ^__^ ^___^ -_- -__- ._. 0.0 0_0 @_@ (*_*) (-_-) (._.) (>_<) (^_^) (¬_¬) ><(((*> "
              "(╯°□°）╯︵┻━┻ :D :-D :O :-O :P :-P :X :-X :o :-o :p :-p :x :-x :o) ;D ;-D =D 8D 8-D >:o "
              "(o: xD XD xDD XDD O_O O_o o_O o_o 0_o o_0 V_V v_v O.O O.o o.O o.o o.0 0.o V.V v.v (ಠ_ಠ) ಠ_ಠ "
              "ಠ︵ಠ ¯\\(ツ)/¯ C++ and/or w/o <space> '' ' \\\") \\t \\n — ’ ’’").split():
        add(e)
    return sp


def _pieces(ending: str, apo: str) -> list[str]:
    """"n't've" with apostrophe `apo` -> ["n't", "'ve"]; "ll" -> ["'ll"]."""
    out = []
    for part in ending.replace("'ve", " ve").replace("n't", "nt").split():
        out.append(f"n{apo}t" if part == "nt" else f"{apo}{part}")
    return out


SPECIAL_CASES = _special_cases()
