"""Quality of the two model-like parts: language ID (labelled text) and HTML extraction (pages
whose source text is known). Small samples written here always run; the labelled UDHR pages and
the Python docs pages with their .rst sources come from the demo corpus (fetched once into the
test cache, as the corpus tests do)."""

import collections
import json
import re
import statistics

import pytest

from sourcelm.data.formats.readers import decode_html
from sourcelm.data.pipeline.document import Document
from sourcelm.data.steps.extract import Extract, resiliparse_extractor, trafilatura_extractor
from sourcelm.data.steps.langid import LanguageID, load_model, predict
from tests.data.warc_fixtures import ENGLISH, page

# Article 1 of the UDHR (and a second sentence), in the languages a curation run meets most
ARTICLE_1 = {
    "en": "All human beings are born free and equal in dignity and rights. "
          "They are endowed with reason and conscience.",
    "fr": "Tous les êtres humains naissent libres et égaux en dignité et en droits. "
          "Ils sont doués de raison et de conscience.",
    "de": "Alle Menschen sind frei und gleich an Würde und Rechten geboren. Sie sind mit Vernunft und Gewissen begabt.",
    "es": "Todos los seres humanos nacen libres e iguales en dignidad y derechos y, "
          "dotados como están de razón y conciencia.",
    "it": "Tutti gli esseri umani nascono liberi ed eguali in dignità e diritti. "
          "Essi sono dotati di ragione e di coscienza.",
    "pt": "Todos os seres humanos nascem livres e iguais em dignidade e em direitos. "
          "Dotados de razão e de consciência.",
    "nl": "Alle mensen worden vrij en gelijk in waardigheid en rechten geboren. "
          "Zij zijn begiftigd met verstand en geweten.",
    "ru": "Все люди рождаются свободными и равными в своем достоинстве и правах. Они наделены разумом и совестью.",
    "pl": "Wszyscy ludzie rodzą się wolni i równi pod względem swej godności i swych praw. "
          "Są oni obdarzeni rozumem i sumieniem.",
    "sv": "Alla människor är födda fria och lika i värde och rättigheter. De är utrustade med förnuft och samvete.",
    "tr": "Bütün insanlar hür, haysiyet ve haklar bakımından eşit doğarlar. Akıl ve vicdana sahiptirler.",
    "el": "Όλοι οι άνθρωποι γεννιούνται ελεύθεροι και ίσοι στην αξιοπρέπεια και τα δικαιώματα.",
    "ja": "すべての人間は、生まれながらにして自由であり、かつ、尊厳と権利とについて平等である。",
    "zh": "人人生而自由，在尊严和权利上一律平等。他们赋有理性和良心，并应以兄弟关系的精神相对待。",
    "ko": "모든 인간은 태어날 때부터 자유로우며 그 존엄과 권리에 있어 동등하다.",
    "ar": "يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق. وقد وهبوا عقلاً وضميرًا.",
}


def test_language_id_on_labelled_sentences_offline():
    model = load_model()  # the wheel's lid.176.ftz: no network involved
    for lang, text in ARTICLE_1.items():
        pred, score = predict(model, text)[0]
        assert pred == lang, (lang, pred, score)
        assert score > 0.65, (lang, score)
    step = LanguageID(languages=["de", "fr"])
    kept = [lang for lang, text in ARTICLE_1.items()
            if isinstance(step.process(Document(lang, text, "t")), Document)]
    assert kept == ["fr", "de"]
    assert step.counters == {"kept_fr": 1, "kept_de": 1}


def word_bag(text):
    return collections.Counter(re.findall(r"[^\W_]+", text.lower()))


def precision_recall(extracted, gold):
    e, g = word_bag(extracted), word_bag(gold)
    common = sum((e & g).values())
    return common / max(1, sum(e.values())), common / max(1, sum(g.values()))


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_extraction_keeps_the_article_and_drops_navigation(extractor):
    html = page("The valley", ENGLISH).decode()
    step = Extract(extractor=extractor)
    doc = step.process(Document("x", html, "t", metadata={"html": True}))
    assert "html" not in doc.metadata
    p, r = precision_recall(doc.text, " ".join(ENGLISH))
    assert r == 1.0 and p > 0.9, (p, r, doc.text)
    assert "Copyright" not in doc.text and "<p>" not in doc.text
    assert Extract().process(Document("y", "<html><body><script>x=1</script></body></html>", "t",
                                      metadata={"html": True})) == "no_text"
    plain = Document("z", "already text", "t")
    assert Extract().process(plain) is plain  # documents that are not HTML pass untouched


def test_extraction_time_limit_and_errors():
    slow = Extract(timeout=0.05)

    def hang(html):
        while True:
            pass

    slow._extract = hang
    assert slow.process(Document("a", "<p>x</p>", "t", metadata={"html": True})) == "timeout"
    broken = Extract()

    def fail(html):
        raise RuntimeError("parser crashed")

    broken._extract = fail
    assert broken.process(Document("b", "<p>x</p>", "t", metadata={"html": True})) == "extraction_error"
    assert broken.counters == {"error_RuntimeError": 1}


@pytest.mark.slow
def test_language_id_accuracy_on_udhr_pages(demo_corpus):
    """Every UDHR page whose BCP-47 tag is a two-letter code the model knows (118 pages): overall
    accuracy, and exactness on the widely spoken languages. Measured: 0.86 overall; the misses are
    dialects and small languages (Occitan, Walloon, Manx, Somali...), a known limit of lid.176.ftz."""
    labels = json.loads((demo_corpus / "udhr" / "labels.json").read_text())
    model = load_model()
    known = {label for label, _ in predict(model, "x", k=400)}
    extract = resiliparse_extractor()
    results = {}
    for name, label in sorted(labels.items()):
        code = label["bcp47"]
        if len(code) == 2 and code in known:
            text = extract(decode_html((demo_corpus / "udhr" / name).read_bytes(), None))
            results[name] = (code, predict(model, text)[0][0])
    accuracy = sum(c == p for c, p in results.values()) / len(results)
    assert len(results) > 100 and accuracy >= 0.84, accuracy
    major = {"en", "fr", "de", "es", "it", "pt", "ru", "nl", "pl", "sv", "tr", "ja", "ko", "ar", "el", "cs", "da", "fi"}
    misses = [(n, c, p) for n, (c, p) in results.items() if c in major and c != p and not labels[n]["name"].count("(")]
    assert misses == []


@pytest.mark.slow
def test_extraction_quality_on_python_docs_against_their_sources(demo_corpus):
    """The crawled Python doc pages against their own .rst sources (word bags; rst markup makes the
    gold a little noisy). Measured with resiliparse main-content: precision 0.99, recall 0.87."""
    from warcio.archiveiterator import ArchiveIterator

    gold = json.loads((demo_corpus / "gold" / "python" / "pages.json").read_text())
    pages = {}
    with open(demo_corpus / "warc" / "python-docs.warc.gz", "rb") as f:
        for rec in ArchiveIterator(f):
            if rec.rec_type == "response" and rec.http_headers.get_statuscode() == "200":
                path = "/" + rec.rec_headers.get_header("WARC-Target-URI").split("/", 3)[3]
                if path in gold:
                    pages[path] = decode_html(rec.content_stream().read(), None)
    assert len(pages) >= 50
    for name, extract, n_pages, min_p, min_r in (("resiliparse", resiliparse_extractor(), len(pages), 0.95, 0.8),
                                                 ("trafilatura", trafilatura_extractor(), 10, 0.9, 0.8)):
        scores = [precision_recall(extract(html), (demo_corpus / "gold" / "python" / gold[path]).read_text())
                  for path, html in sorted(pages.items())[:n_pages]]
        p = statistics.mean(s[0] for s in scores)
        r = statistics.mean(s[1] for s in scores)
        assert p >= min_p and r >= min_r, (name, p, r)
