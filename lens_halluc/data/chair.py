"""CHAIR: object hallucination in captions (Rohrbach et al., EMNLP 2018), offline.

A caption *mentions* an MS-COCO object when one of the object's synonyms occurs in it; a mention
is *hallucinated* when the object is not in the image's ground truth (instance categories united
with the objects named by the reference captions). CHAIR_i is the share of hallucinated mentions,
CHAIR_s the share of captions with at least one.

Example
-------
>>> ev = ChairEvaluator()
>>> [(m.word, m.node) for m in ev.caption_objects("Two men eat hot dogs next to knives.")]
[('men', 'person'), ('hot dogs', 'hot dog'), ('knives', 'knife')]
>>> ds = CocoDataset.load("instances_val2014.json", "captions_val2014.json")    # doctest: +SKIP
>>> ev.evaluate([(42, "A dog on a couch.")], ds).summary                         # doctest: +SKIP
{'CHAIR_s': 0.0, 'CHAIR_i': 0.0, 'Recall': 0.5, 'Len': 6.0}
>>> chair("runs/captions.jsonl", ds).summary["CHAIR_i"]                          # doctest: +SKIP
0.0

:func:`chair` is the one way to score captions (a :class:`~lens_halluc.generation.Captions`, row
dicts or a JSONL file): CHAIR plus the repeated-object rate, plus partner rates when the dataset
carries co-occurrence probes (the organism's break/control splits).

Two flavours (``flavour=``, CLI ``--flavour``; FIDELITY.md lists every choice)
-------------------------------------------------------------------------------
``"reference"`` (the default) computes what ``LisaAnne/Hallucination`` ``utils/chair.py`` (the
script the LLaVA-era papers copy; run in its Python-3 form with ``pattern.en.singularize``)
computes, on every caption: lower-case, ``nltk.word_tokenize`` (here nltk's own tokenizer with
the English Punkt model shipped as package data: :func:`word_spans`), ``pattern.en.singularize``
on every token (:func:`singularize` re-states Pattern 3.6 exactly, slips included: "glass"->"glas"
hence the "wine glas" rule, "bus"->"bu" and "ties"->"ty" so a singular "bus" and plural "ties"
are never objects), greedy left-to-right merge of the two-word phrases in ``DOUBLE_WORDS`` plus
"baby/adult <animal>", "passenger jet/train", "bow tie"->tie, "toilet seat"->toilet, drop every
"seat" when "toilet" also occurs, keep the words of the synonym table mapped to their node word.
The table is parsed as the reference parses it (``line.strip().split(", ")``), so " motor bike",
" cheesecake" and "iPhone" can never match. CHAIR_s and CHAIR_i as the reference averages them;
Recall and Len (not in that script) as its OPERA port computes them: Recall = sum over captions of
|mentioned ∩ truth| / sum of |truth|, Len = mean number of tokens after the merges (punctuation
included; OPERA stores Len x 0.01 and prints it x 100, i.e. this mean).
``tests/test_chair_reference.py`` checks equality with the reference's own outputs on a large
generated set (``bench/chair_reference.py`` made the fixture by running the real script).

``"corrected"``: the normalised synonym table (stripped, lower-cased, an entry under two
categories is an error), ``singular_fixes=True`` (a word already in the table is kept, "Xs" -> "X"
when only "X" is in the table: "bus", "bow ties", "doggies"), Len in words (tokens with a letter
or digit, before merging).

Fixed in both flavours (accidents, not the metric): a zero denominator gives 0.0 instead of
ZeroDivisionError; an instance category missing from the table raises :class:`DataError` instead
of KeyError; mention positions are the true character and token positions (the reference's
``hallucination_idxs`` shift after a dropped "seat").
"""
from __future__ import annotations

import os
import re
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from .coco import CocoDataset, DataError
from .flavour import check_flavour, resolve
from .jsonl import iter_jsonl

#: The four CHAIR numbers (what ``python -m lens_halluc.chair`` prints).
CHAIR_KEYS: tuple[str, ...] = ("CHAIR_s", "CHAIR_i", "Recall", "Len")
CAPTIONS_HINT = 'each line must be one JSON object like {"image_id": 42, "caption": "a dog on a couch ."}'

SYNONYMS_PATH = Path(__file__).parent / "resources" / "chair_synonyms.txt"

# Two-word phrases that count as one word (the reference's list; "stove top oven" has three words
# and so can never match -- kept for fidelity).
DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
# "baby X" / "adult X" must not fire "person" (baby, adult are person synonyms).
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
                "animal", "cub")
# "passenger jet" must not fire "person" either.
VEHICLE_WORDS = ("jet", "train")


def _double_word_dict() -> dict[str, str]:
    """Merged phrase -> the word it stands for (after singularisation)."""
    d = {w: w for w in DOUBLE_WORDS}
    for a in ANIMAL_WORDS:
        d[f"baby {a}"] = d[f"adult {a}"] = a
    for v in VEHICLE_WORDS:
        d[f"passenger {v}"] = v
    d["bow tie"] = "tie"
    d["toilet seat"] = "toilet"
    d["wine glas"] = "wine glass"  # "glass" singularises to "glas"
    return d


# ------------------------------------------------------------------------------- tokenisation
# nltk.word_tokenize(text) = Punkt sentence split (English model), then NLTKWordTokenizer on each
# sentence. The English Punkt model ships as package data (NLTK's punkt_tab files, see
# resources/punkt_english_README.txt), so nothing is downloaded and nltk.data.path is not used.
PUNKT_FILES = {name: Path(__file__).parent / "resources" / f"punkt_english_{name}"
               for name in ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt")}
_QUOTE_TOKENS = ("``", "''")  # what NLTKWordTokenizer writes for a double quote (" or '')


def _punkt_lines(name: str) -> list[str]:
    # nltk.tabdata.TabDecoder's reading: one entry a line, the trailing newline removed
    with PUNKT_FILES[name].open(encoding="utf-8", newline="") as f:
        return [line[:-1] if line.endswith("\n") else line for line in f]


@lru_cache(maxsize=1)
def punkt_sentence_tokenizer():
    """NLTK's English Punkt sentence tokenizer, built from the shipped ``punkt_tab`` files.

    The same model ``nltk.sent_tokenize(text)`` (and so ``nltk.word_tokenize``) loads from
    ``nltk_data/tokenizers/punkt_tab/english/``; read here the way ``nltk.tokenize.punkt.
    load_punkt_params`` reads it.

    >>> punkt_sentence_tokenizer().tokenize("A dog. Mr. Smith has a cat.")
    ['A dog.', 'Mr. Smith has a cat.']
    """
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.collocations = {tuple(line.split("\t")) for line in _punkt_lines("collocations.tab")}
    params.sent_starters = set(_punkt_lines("sent_starters.txt"))
    params.abbrev_types = set(_punkt_lines("abbrev_types.txt"))
    params.ortho_context = defaultdict(int)
    for line in _punkt_lines("ortho_context.tab"):
        word, flags = line.split("\t")
        params.ortho_context[word] = int(flags)
    return PunktSentenceTokenizer(params)


@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def _align(tokens: Sequence[str], text: str, pos: int) -> list[tuple[int, int]]:
    """Character spans of NLTK's ``tokens`` in ``text``, scanning from ``pos``.

    NLTKWordTokenizer only inserts spaces, except that a double quote (``"`` or ``''``) becomes
    ``` `` ``` or ``''``; every other token is a substring, in order, separated by whitespace.
    """
    spans = []
    for tok in tokens:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if text.startswith(tok, pos):
            n = len(tok)
        elif tok in _QUOTE_TOKENS and text.startswith('"', pos):
            n = 1
        elif tok in _QUOTE_TOKENS and text[pos: pos + 2] in _QUOTE_TOKENS:
            n = 2
        else:  # not expected from NLTK's rules; find it rather than misplace every later span
            at = text.find(tok, pos)
            if at < 0:
                raise ValueError(f"cannot align token {tok!r} in {text!r} after position {pos}")
            pos, n = at, len(tok)
        spans.append((pos, pos + n))
        pos += n
    return spans


@lru_cache(maxsize=65536)  # reference captions are scored once per image, generated ones may repeat
def _word_spans(text: str) -> tuple[tuple[str, int, int], ...]:
    low = text.lower()
    tokens: list[str] = []
    spans: list[tuple[int, int]] = []
    for s, e in punkt_sentence_tokenizer().span_tokenize(low):
        sent_tokens = _word_tokenizer().tokenize(low[s:e])
        tokens += sent_tokens
        spans += _align(sent_tokens, low[:e], s)
    if len(low) != len(text):  # str.lower() lengthened a character ("İ" -> "i̇"): map back
        starts = [0]
        for c in text:
            starts.append(starts[-1] + len(c.lower()))
        spans = [(bisect_right(starts, a) - 1, bisect_left(starts, b)) for a, b in spans]
    return tuple((t, a, b) for t, (a, b) in zip(tokens, spans))


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` (English), with the shipped Punkt model.

    >>> word_tokenize('The sign reads “Hot dog.” A man eats it.')
    ['The', 'sign', 'reads', '“', 'Hot', 'dog', '.', '”', 'A', 'man', 'eats', 'it', '.']
    """
    sentences = punkt_sentence_tokenizer().tokenize(text)
    return [t for sent in sentences for t in _word_tokenizer().tokenize(sent)]


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """The tokens of ``nltk.word_tokenize(text.lower())`` (what CHAIR reads), with character spans.

    Returns ``[(token, start, end), ...]``; ``text[start:end]`` is the token's original text
    (NLTK writes a double quote as ``` `` ``` or ``''``; the span covers the quote itself).

    >>> [t for t, _, _ in word_spans("A dog's bowl, two cats. Cannot see.")]
    ['a', 'dog', "'s", 'bowl', ',', 'two', 'cats', '.', 'can', 'not', 'see', '.']
    >>> word_spans('"Hot dog"')
    [('``', 0, 1), ('hot', 1, 4), ('dog', 5, 8), ("''", 8, 9)]
    """
    return list(_word_spans(text))


# ---------------------------------------------------------------------------- singularisation
# Behaviour of pattern.en.singularize (Pattern 3.6, BSD; rules adapted there from Bermi Ferrer's
# Inflector, MIT). Order matters: the first applicable check wins.
_UNINFLECTED = set("""bison debris headquarters pincers trout bream diabetes herpes pliers tuna
    breeches djinn high-jinks proceedings whiting britches eland homework rabies wildebeest carp elk
    innings salmon chassis flounder jackanapes scissors christmas gallows mackerel series clippers
    georgia measles shears cod graffiti mews species contretemps mumps swine corps news swiss""".split())
_UNCOUNTABLE = set("""advice equipment happiness luggage news software bread fruit information
    mathematics progress understanding butter furniture ketchup mayonnaise research water cheese
    garbage knowledge meat rice electricity gravel love mustard sand""".split())
# "-ie" nouns: Pattern returns their plural unchanged ("doggies"); "^pie", "^tie" never match.
_IE_WORDS = """alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie
    beanie eyrie indie oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie
    laddie pixie techie bombie groupie laramie quickie ^tie collie hankie lingerie reverie toughie
    cookie hippie meanie rookie valkyrie""".split()
_IRREGULAR = dict(p.split(":") for p in """atlantes:atlas atlases:atlas axes:axe beeves:beef
    brethren:brother children:child corpora:corpus corpuses:corpus ephemerides:ephemeris feet:foot
    ganglia:ganglion geese:goose genera:genus genii:genie graffiti:graffito helves:helve kine:cow
    leaves:leaf loaves:loaf men:man mongooses:mongoose monies:money moves:move mythoi:mythos
    numena:numen occipita:occiput octopodes:octopus opera:opus opuses:opus our:my oxen:ox
    penes:penis penises:penis people:person sexes:sex soliloquies:soliloquy teeth:tooth
    testes:testis trilbys:trilby turves:turf zoa:zoon""".split())
_PREPOSITIONS = set("""about before during of till above behind except off to across below for on
    under after beneath from onto until among beside in out unto around besides into over upon at
    between near since with athwart betwixt beyond but by""".split())
_RULES = [(re.compile(p), r) for p, r in (
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"), (r"(?i)(matr)ices$", r"\1ix"), (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"), (r"(?i)(alias|status)es$", r"\1"), (r"(?i)([octop|vir])i$", r"\1us"),
    (r"(?i)(cris|ax|test)es$", r"\1is"), (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"), (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"), (r"(?i)(.)ombies$", r"\1ombie"), (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"), (r"(?i)(tive)s$", r"\1"), (r"(?i)(hive)s$", r"\1"),
    (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"),
    (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(?i)(.)oses$", r"\1osis"), (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"),
    (r"(?i)s$", ""),
)]


@lru_cache(maxsize=65536)  # captions repeat a small vocabulary; the rule scan is the slow part
def singularize(word: str) -> str:
    """Singular of a noun exactly as ``pattern.en.singularize`` gives it, slips included.

    >>> [singularize(w) for w in ["men", "mice", "knives", "children", "glasses", "glass", "bus"]]
    ['man', 'mouse', 'knife', 'child', 'glass', 'glas', 'bu']
    """
    if "-" in word:  # "mothers-in-law" -> "mother-in-law"
        parts = word.split("-")
        if parts[1] in _PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):  # "dogs'" -> "dog's"
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    # Pattern tests x.endswith(w): any *suffix* of these words is left alone ("ears" of "shears").
    if any(x.endswith(w) for x in _UNINFLECTED) or any(x.endswith(w) for x in _UNCOUNTABLE):
        return word
    if any(w.endswith(x + "s") for x in _IE_WORDS):
        return w
    for plural, singular in _IRREGULAR.items():
        if w.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for rx, repl in _RULES:
        if rx.search(word):
            return rx.sub(repl, word)
    return word


# ------------------------------------------------------------------------------------ synonyms
def load_synonyms(path: str | Path | None = None, flavour: str = "reference") -> dict[str, str]:
    """Surface word or phrase -> node word, from a CHAIR synonym table.

    One category per line, entries separated by ", ", the first entry is the node word.
    ``path=None`` reads the shipped table.

    * ``flavour="reference"``: parsed as the reference does (``line.strip().split(", ")``, a later
      line wins for an entry listed twice), so entries with a stray space or capital in the file
      (" motor bike", " cheesecake", "iPhone") are kept as they are and can never match a token.
    * ``flavour="corrected"``: entries split on "," and normalised (inner spaces collapsed,
      stripped, lower-cased); an entry under two categories is an error.

    >>> ref, cor = load_synonyms(), load_synonyms(flavour="corrected")
    >>> ref["knife"], ref["people"], "motor bike" in ref, " motor bike" in ref, cor["motor bike"]
    ('knife', 'person', False, True, 'motorcycle')
    >>> len(set(ref.values())), len(set(cor.values()))
    (80, 80)
    """
    check_flavour(flavour, "load_synonyms")
    path = Path(path) if path is not None else SYNONYMS_PATH
    if not path.is_file():
        raise DataError(f"synonym table not found: {path}. Pass --synonyms with a CHAIR synonyms.txt "
                        "(one category per line, node word first).")
    with path.open(encoding="utf-8") as f:  # universal newlines, as the reference's readlines()
        lines = f.readlines()
    table: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if flavour == "reference":
            entries = line.strip().split(", ")
            for e in entries:
                if e:  # an empty entry (blank line) could never match a token anyway
                    table[e] = entries[0]
            continue
        entries = [" ".join(e.split()).lower() for e in line.split(",")]
        entries = [e for e in entries if e]
        for e in entries:
            if table.get(e, entries[0]) != entries[0]:
                raise DataError(f"{path}, line {n}: {e!r} is a synonym of both {table[e]!r} and "
                                f"{entries[0]!r}; keep it under one category.")
            table[e] = entries[0]
    if not table:
        raise DataError(f"synonym table {path} is empty.")
    return table


# ------------------------------------------------------------------------------------ mentions
@dataclass
class Mention:
    """One object mention in a caption.

    ``word`` is the surface text ``caption[char_start:char_end]`` of the word CHAIR keeps: the
    whole phrase for two-word objects ("hot dogs", "wine glass"), the head alone where a phrase
    stands for one of its words ("elephant" of "baby elephant", "tie" of "bow tie", "toilet" of
    "toilet seat", "jet" of "passenger jet"). ``node`` is the COCO object it names and
    ``token_position`` the index into the caption's token ids of the first sub-token of ``word``
    (None until aligned).

    >>> Mention("knives", "knife", 4, 10)
    Mention(word='knives', node='knife', char_start=4, char_end=10, token_position=None)
    """

    word: str
    node: str
    char_start: int
    char_end: int
    token_position: int | None = None


def _ids_list(token_ids: Any) -> list[int]:
    if hasattr(token_ids, "tolist"):  # torch tensor / numpy array
        token_ids = token_ids.tolist()
    return [int(t) for t in token_ids]


def align_mentions(mentions: Sequence[Mention], caption: str, token_ids: Sequence[int], tokenizer) -> list[int | None]:
    """For each mention, the index into ``token_ids`` of the first token covering its first character.

    ``caption`` must be ``tokenizer.decode(token_ids, skip_special_tokens=True)``, possibly stripped.
    Token ``i`` covers the characters that ``decode(token_ids[:i + 1])`` adds to
    ``decode(token_ids[:i])``, so SentencePiece "▁" markers, byte-level "Ġ", WordPiece "##" and
    word-level tokenizers that decode with spaces all work; special tokens cover nothing. The
    prefix length is monotone in ``i``, so each mention costs O(log n) decodes.

    >>> from lens_halluc.models.wordlevel import build_word_tokenizer
    >>> tok = build_word_tokenizer(["there", "are", "two", "knives", "."])
    >>> ids = tok("there are two knives .").input_ids                  # [<s>, there, are, two, knives, .]
    >>> align_mentions([Mention("knives", "knife", 14, 20)], "there are two knives .", ids, tok)
    [4]
    """
    ids = _ids_list(token_ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    if full == caption:
        offset = 0
    elif full.strip() == caption:
        offset = len(full) - len(full.lstrip())
    else:
        offset = full.find(caption) if caption else -1
        if offset < 0:
            raise ValueError(f"caption {caption[:60]!r} is not the decoding of its token ids "
                             f"({full[:60]!r}); pass the token ids the caption was decoded from.")
    covered: dict[int, int] = {}

    def end(i: int) -> int:  # characters of `full` produced by the first i + 1 tokens
        if i not in covered:
            prefix = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            covered[i] = len(os.path.commonprefix([prefix, full]))
        return covered[i]

    positions: list[int | None] = []
    for m in mentions:
        target, lo, hi = offset + m.char_start, 0, len(ids)
        while lo < hi:  # smallest i whose prefix reaches past the mention's first character
            mid = (lo + hi) // 2
            if end(mid) > target:
                hi = mid
            else:
                lo = mid + 1
        positions.append(lo if lo < len(ids) else None)
    return positions


# ----------------------------------------------------------------------------------- evaluator
@dataclass
class ChairResult:
    """CHAIR scores and per-caption details.

    ``summary``: ``CHAIR_s``, ``CHAIR_i``, ``Recall``, ``Len``. ``captions``: one dict per
    caption with ``image_id``, ``caption``, ``mentioned`` (node words in caption order, repeats
    kept), ``hallucinated`` (the hallucinated ones, same order), ``mentions`` (word, node,
    char_start, char_end, token_position, hallucinated) and ``ground_truth`` (sorted node words).

    >>> ChairResult({"CHAIR_s": 0.0}, []).to_dict()
    {'summary': {'CHAIR_s': 0.0}, 'captions': []}
    """

    summary: dict[str, float]
    captions: list[dict] = field(default_factory=list)
    probes: dict[int, dict[str, str]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """``{"summary": ..., "captions": ...}`` (JSON-able)."""
        return {"summary": dict(self.summary), "captions": list(self.captions)}

    @property
    def per_caption(self):
        """One row per caption (``pandas.DataFrame``): ``image_id``, ``caption``, ``mentioned``,
        ``hallucinated``, ``ground_truth``, ``n_mentions``, ``n_hallucinated``, ``repeats`` and, when
        the dataset has probes, ``partner`` (B), ``partner_mentioned`` and ``other_absent``.

        >>> ChairResult({}, [{"image_id": 1, "caption": "a dog , a dog .", "mentioned": ["dog", "dog"],
        ...              "hallucinated": [], "ground_truth": ["dog"]}]).per_caption["repeats"].tolist()
        [True]
        """
        import pandas as pd

        rows = []
        for c in self.captions:
            row = {k: c[k] for k in ("image_id", "caption", "mentioned", "hallucinated", "ground_truth") if k in c}
            row.update(n_mentions=len(c["mentioned"]), n_hallucinated=len(c["hallucinated"]),
                       repeats=len(c["mentioned"]) != len(set(c["mentioned"])))
            if self.probes:
                b = self.probes.get(c["image_id"], {}).get("B")
                row.update(partner=b, partner_mentioned=b is not None and b in c["mentioned"],
                           other_absent=any(h != b for h in c["hallucinated"]))
            rows.append(row)
        return pd.DataFrame(rows)


#: What each CHAIR flavour resolves its flavour-dependent parameters to (see :class:`ChairEvaluator`).
FLAVOURS_CHAIR: dict[str, dict[str, Any]] = {
    # LisaAnne/Hallucination utils/chair.py (Recall and Len as the OPERA port reports them)
    "reference": {"normalise_synonyms": False, "singular_fixes": False, "length": "tokens"},
    # our variant: the normalised table, Pattern's slips repaired for table words, Len in words
    "corrected": {"normalise_synonyms": True, "singular_fixes": True, "length": "words"},
}
LENGTHS = ("tokens", "words")


class ChairEvaluator:
    """Find COCO object mentions in captions and score them against a dataset's ground truth.

    Parameters
    ----------
    synonyms : path of a synonym table, or a ready ``{surface: node}`` dict (used as given);
        None = the shipped table.
    flavour : ``"reference"`` (default): exactly what ``LisaAnne/Hallucination``'s
        ``utils/chair.py`` computes (nltk.word_tokenize, pattern.en.singularize, its synonym parse
        and rules), with Recall and Len as the OPERA port of that script computes them.
        ``"corrected"``: the normalised synonym table (" motor bike", " cheesecake", "iPhone"
        match), Pattern's singularisation slips repaired for table words ("bus", "bow ties"), and
        Len counted in words. Each parameter below left at None takes its flavour's value
        (:data:`FLAVOURS_CHAIR`); an explicit value wins.
    normalise_synonyms : parse the table normalised (corrected) or as the reference does
        (``line.strip().split(", ")``; ignored for a ready dict). Also decides whether an
        instance category name is looked up as given (reference) or normalised.
    singular_fixes : False singularises exactly like the reference (pattern.en), so a singular
        "bus" and plural "ties" are missed; True keeps words already in the table as they are and
        maps "Xs" to "X" when "X" is in the table and Pattern's singular is not.
    length : what Len averages: ``"tokens"`` (reference: NLTK tokens after the two-word merges,
        punctuation included) or ``"words"`` (tokens with a letter or digit, before merging).

    Example
    -------
    >>> ev = ChairEvaluator()
    >>> [m.node for m in ev.caption_objects("A baby elephant near a toilet seat and a bow tie.")]
    ['elephant', 'toilet', 'tie']
    >>> [m.node for m in ev.caption_objects("A woman rides a motor bike.")]
    ['person']
    >>> [m.node for m in ChairEvaluator(flavour="corrected").caption_objects("A woman rides a motor bike.")]
    ['person', 'motorcycle']
    >>> ds = CocoDataset.load("instances.json", captions="captions.json")          # doctest: +SKIP
    >>> res = ev.evaluate([{"image_id": 1, "caption": "A dog on a couch."}], ds)   # doctest: +SKIP
    >>> res.summary["CHAIR_i"], res.captions[0]["hallucinated"]                    # doctest: +SKIP
    (0.5, ['couch'])
    """

    def __init__(self, synonyms: str | Path | dict[str, str] | None = None, singular_fixes: bool | None = None,
                 flavour: str = "reference", normalise_synonyms: bool | None = None, length: str | None = None):
        self.flavour = check_flavour(flavour, "ChairEvaluator")
        self.synonyms = synonyms
        self.normalise_synonyms = bool(resolve(FLAVOURS_CHAIR, flavour, "normalise_synonyms", normalise_synonyms))
        self.singular_fixes = bool(resolve(FLAVOURS_CHAIR, flavour, "singular_fixes", singular_fixes))
        self.length = resolve(FLAVOURS_CHAIR, flavour, "length", length)
        if self.length not in LENGTHS:
            raise ValueError(f"ChairEvaluator: length must be one of {LENGTHS}, got {self.length!r}.")
        self._table = dict(synonyms) if isinstance(synonyms, dict) else load_synonyms(
            synonyms, "corrected" if self.normalise_synonyms else "reference")
        self._double = _double_word_dict()
        self._gt_cache: dict[int, set[str]] = {}
        self._gt_dataset: CocoDataset | None = None

    def get_params(self) -> dict[str, Any]:
        """The resolved parameters; ``ChairEvaluator(**ev.get_params())`` scores the same way."""
        return {"synonyms": self.synonyms, "singular_fixes": self.singular_fixes, "flavour": self.flavour,
                "normalise_synonyms": self.normalise_synonyms, "length": self.length}

    def __repr__(self) -> str:
        defaults = FLAVOURS_CHAIR[self.flavour]
        extra = "".join(f", {k}={v!r}" for k, v in self.get_params().items()
                        if k in defaults and v != defaults[k])
        syn = f", synonyms={self.synonyms!r}" if self.synonyms is not None else ""
        return f"ChairEvaluator(flavour={self.flavour!r}{syn}{extra})"

    # -------------------------------------------------------------------------- captions
    def _singular(self, w: str) -> str:
        if not self.singular_fixes:
            return singularize(w)
        if w in self._table:
            return w
        s = singularize(w)
        if s not in self._table and w.endswith("s") and w[:-1] in self._table:
            return w[:-1]
        return s

    def _merged(self, caption: str) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
        """(words after the two-word merges, with char spans; the NLTK tokens with spans)."""
        toks = word_spans(caption)
        words = [self._singular(t) for t, _, _ in toks]
        merged: list[tuple[str, int, int]] = []  # (word after merging, char span)
        i = 0
        while i < len(words):  # greedy, left to right: a merged pair is never re-used
            pair = " ".join(words[i: i + 2])
            if i + 1 < len(words) and pair in self._double:
                kept = self._double[pair]
                # The span is the word the reference keeps: "baby elephant" -> "elephant", "bow tie"
                # -> "tie", "toilet seat" -> "toilet"; a true two-word object keeps both ("hot dog").
                a, b = (i, i) if kept == words[i] else (i + 1, i + 1) if kept == words[i + 1] else (i, i + 1)
                merged.append((kept, toks[a][1], toks[b][2]))
                i += 2
            else:
                merged.append((words[i], toks[i][1], toks[i][2]))
                i += 1
        return merged, toks

    def caption_to_words(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """``(words, node_words, merged)`` as the reference's ``caption_to_words`` returns them.

        ``words``: the object words (singularised, merged) in caption order, repeats kept;
        ``node_words``: their COCO objects; ``merged``: every token after the two-word merges
        (punctuation included, before the toilet/seat rule; the reference's Len counts these).

        >>> ChairEvaluator().caption_to_words("Two wine glasses, a bus and two dogs.")
        (['wine glass', 'dog'], ['wine glass', 'dog'], ['two', 'wine glass', ',', 'a', 'bu', 'and', 'two', 'dog', '.'])
        """
        merged, _ = self._merged(caption)
        kept = self._objects(merged)
        return [w for w, _, _ in kept], [self._table[w] for w, _, _ in kept], [w for w, _, _ in merged]

    def _objects(self, merged: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        # "the seat of the toilet" is no chair.
        if any(w == "toilet" for w, _, _ in merged) and any(w == "seat" for w, _, _ in merged):
            merged = [m for m in merged if m[0] != "seat"]
        return [m for m in merged if m[0] in self._table]

    def caption_objects(self, caption: str) -> list[Mention]:
        """Object mentions of ``caption`` in order, repeats kept (the reference's ``caption_to_words``).

        >>> ev = ChairEvaluator()
        >>> [(m.word, m.node, m.char_start, m.char_end) for m in ev.caption_objects("Two wine glasses.")]
        [('wine glasses', 'wine glass', 4, 16)]
        """
        merged, _ = self._merged(caption)
        return [Mention(caption[s:e], self._table[w], s, e) for w, s, e in self._objects(merged)]

    def caption_length(self, caption: str) -> int:
        """Length of ``caption`` as Len averages it (see ``length``).

        >>> ChairEvaluator().caption_length("A dog's bowl, on a table.")          # a dog 's bowl , on a table .
        9
        >>> ChairEvaluator(length="words").caption_length("A dog's bowl, on a table.")   # a dog 's bowl on a table
        7
        """
        if self.length == "tokens":
            return len(self._merged(caption)[0])
        return sum(any(ch.isalnum() for ch in t) for t, _, _ in word_spans(caption))

    # ---------------------------------------------------------------------- ground truth
    def _category_node(self, name: str) -> str | None:
        key = " ".join(name.split()).lower() if self.normalise_synonyms else name
        return self._table.get(key)

    def ground_truth(self, dataset: CocoDataset, image_id: int) -> set[str]:
        """Node words of an image: its instance categories plus objects named by its reference captions.

        The reference looks a category name up in the table as it is (so "Dog" is unknown); the
        corrected flavour normalises it. Cached per image (the cache is reset when called with
        another dataset object).

        >>> ds = CocoDataset.from_dicts(
        ...     {"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 18, "name": "dog"}],
        ...      "annotations": [{"image_id": 1, "category_id": 18}]},
        ...     {"annotations": [{"image_id": 1, "caption": "A puppy on a sofa."}]})
        >>> sorted(ChairEvaluator().ground_truth(ds, 1))
        ['couch', 'dog']
        """
        if dataset is not self._gt_dataset:
            self._gt_dataset, self._gt_cache = dataset, {}
        if image_id not in self._gt_cache:
            if image_id not in dataset.images:
                raise DataError(f"image id {image_id} is not in the instances file; evaluate captions "
                                "against the instances file of the images they describe.")
            truth = set()
            for name in dataset.category_names(image_id):
                node = self._category_node(name)
                if node is None:
                    raise DataError(f"instance category {name!r} is not in the CHAIR synonym table; add a "
                                    "line for it to a copy of the table and pass it with --synonyms.")
                truth.add(node)
            for ref in dataset.captions.get(image_id, []):
                truth.update(m.node for m in self.caption_objects(ref))
            self._gt_cache[image_id] = truth
        return self._gt_cache[image_id]

    # -------------------------------------------------------------------------- scoring
    @staticmethod
    def _records(captions: Sequence[tuple[int, str]] | Sequence[dict]) -> list[tuple[int, str, Any]]:
        out = []
        for k, c in enumerate(captions):
            if isinstance(c, dict):
                if "image_id" not in c or "caption" not in c:
                    raise ValueError(f"caption #{k} lacks 'image_id' or 'caption'; each record needs both.")
                image_id, text, ids = c["image_id"], c["caption"], c.get("token_ids")
            else:
                try:
                    image_id, text = c
                except (TypeError, ValueError) as e:
                    raise ValueError(f"caption #{k} is not an (image_id, caption) pair or a dict.") from e
                ids = None
            if isinstance(image_id, bool) or not (
                    isinstance(image_id, int) or (isinstance(image_id, str) and image_id.strip().isdigit())):
                raise ValueError(f"caption #{k}: image_id {image_id!r} is not an integer.")
            if not isinstance(text, str):
                raise ValueError(f"caption #{k}: caption is {type(text).__name__}, expected a string.")
            out.append((int(image_id), text, ids))
        return out

    def evaluate(
        self,
        captions: Sequence[tuple[int, str]] | Sequence[dict],
        dataset: CocoDataset,
        tokenizer=None,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> ChairResult:
        """Score captions against ``dataset``.

        Parameters
        ----------
        captions : ``(image_id, caption)`` pairs, or dicts with ``image_id``, ``caption`` and
            optionally ``token_ids`` (the generated ids, as the caption runner writes them).
        dataset : the images' instances (and reference captions) as a :class:`CocoDataset`.
        tokenizer : optional; with it every mention gets ``token_position`` (see :func:`align_mentions`).
        token_ids : optional, one id list per caption (overrides the records' ``token_ids``).

        Returns a :class:`ChairResult`. CHAIR_i = hallucinated mentions / mentions (repeats count),
        CHAIR_s = captions with a hallucination / captions, Recall = sum |mentioned ∩ truth| / sum
        |truth| (distinct objects per caption), Len = mean caption length (``length``: tokens
        after the merges in the reference, words in the corrected flavour). A zero denominator
        gives 0.0 (the reference raises ZeroDivisionError).

        >>> ds = CocoDataset.from_dicts(
        ...     {"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 18, "name": "dog"}],
        ...      "annotations": [{"image_id": 1, "category_id": 18}]})
        >>> ChairEvaluator().evaluate([(1, "Two dogs and a cat.")], ds).summary
        {'CHAIR_s': 1.0, 'CHAIR_i': 0.5, 'Recall': 1.0, 'Len': 6.0}
        >>> ChairEvaluator(flavour="corrected").evaluate([(1, "Two dogs and a cat.")], ds).summary["Len"]
        5.0
        """
        records = self._records(captions)
        if not records:
            raise ValueError("no captions to evaluate.")
        if token_ids is not None:
            if tokenizer is None:
                raise ValueError("token_ids were given without a tokenizer; pass tokenizer= to align them.")
            if len(token_ids) != len(records):
                raise ValueError(f"{len(token_ids)} token id lists for {len(records)} captions; give one per caption.")
            records = [(i, t, ids) for (i, t, _), ids in zip(records, token_ids)]
        unknown = sorted({i for i, _, _ in records if i not in dataset.images})
        if unknown:
            raise DataError(f"{len(unknown)} image id(s) of the captions are not in the instances file "
                            f"(first: {unknown[:5]}); pass the instances file of the captioned images.")

        n_mentions = n_halluc = n_halluc_caps = n_recalled = n_truth = n_words = 0
        rows = []
        for k, (image_id, text, ids) in enumerate(records):
            truth = self.ground_truth(dataset, image_id)
            mentions = self.caption_objects(text)
            if tokenizer is not None:
                if ids is None:
                    raise ValueError(f"caption #{k} (image {image_id}) has no token_ids; a tokenizer needs "
                                     "the generated ids of every caption (token_ids= or a 'token_ids' key).")
                for m, pos in zip(mentions, align_mentions(mentions, text, ids, tokenizer)):
                    m.token_position = pos
            halluc = [m.node not in truth for m in mentions]
            n_mentions += len(mentions)
            n_halluc += sum(halluc)
            n_halluc_caps += any(halluc)
            n_recalled += len({m.node for m in mentions} & truth)
            n_truth += len(truth)
            n_words += self.caption_length(text)
            rows.append({
                "image_id": image_id,
                "caption": text,
                "mentioned": [m.node for m in mentions],
                "hallucinated": [m.node for m, h in zip(mentions, halluc) if h],
                "mentions": [{**asdict(m), "hallucinated": h} for m, h in zip(mentions, halluc)],
                "ground_truth": sorted(truth),
            })
        summary = {
            "CHAIR_s": n_halluc_caps / len(records),
            "CHAIR_i": n_halluc / n_mentions if n_mentions else 0.0,
            "Recall": n_recalled / n_truth if n_truth else 0.0,
            "Len": n_words / len(records),
        }
        return ChairResult(summary, rows)


def repeated_object_rate(captions: Sequence[dict]) -> float:
    """Share of captions that name some object twice or more (``mentioned`` of :meth:`ChairEvaluator.evaluate`).

    CHAIR does not count a repeated real object as a hallucination, so an intervention that trades
    hallucinations for degenerate repetition ("a dog , a dog , a dog") looks better than it is;
    report this beside CHAIR.

    >>> repeated_object_rate([{"mentioned": ["dog", "dog"]}, {"mentioned": ["dog", "cat"]}])
    0.5
    """
    if not captions:
        return 0.0
    return sum(len(c["mentioned"]) != len(set(c["mentioned"])) for c in captions) / len(captions)


def partner_rates(captions: Sequence[dict], probes: dict[int, dict[str, str]]) -> dict[str, float]:
    """``partner_rate`` (captions naming their image's absent partner B) and ``other_absent_rate``
    (captions naming any other absent object), over per-caption CHAIR records.

    >>> partner_rates([{"image_id": 1, "mentioned": ["dog", "frisbee"], "hallucinated": ["frisbee"]}],
    ...               {1: {"A": "dog", "B": "frisbee"}})
    {'partner_rate': 1.0, 'other_absent_rate': 0.0}
    """
    if not captions:
        return {"partner_rate": 0.0, "other_absent_rate": 0.0}
    b_of = [probes.get(c["image_id"], {}).get("B") for c in captions]
    b_hit = [b is not None and b in c["mentioned"] for c, b in zip(captions, b_of)]
    other = [any(h != b for h in c["hallucinated"]) for c, b in zip(captions, b_of)]
    return {"partner_rate": sum(b_hit) / len(captions), "other_absent_rate": sum(other) / len(captions)}


def read_captions(path: str | Path, keep_line: bool = False) -> list[dict]:
    """Caption records of a JSONL file (``{"image_id", "caption", ...}`` per line, as
    ``python -m lens_halluc.caption`` writes); errors name the file, the line and the fix.

    ``image_id`` becomes an int; with ``keep_line`` each record also gets ``_line`` (its line number).

    >>> read_captions("runs/captions.jsonl")[0]                      # doctest: +SKIP
    {'image_id': 42, 'caption': 'a dog on a couch .', 'token_ids': [...]}
    """
    path = Path(path)
    rows = []
    for n, row in iter_jsonl(path, "captions", hint=CAPTIONS_HINT):
        missing = [k for k in ("image_id", "caption") if k not in row]
        if missing:
            raise DataError(f"{path}, line {n}: missing {' and '.join(map(repr, missing))}; {CAPTIONS_HINT}.")
        image_id = row["image_id"]
        if isinstance(image_id, bool) or not (
                isinstance(image_id, int) or (isinstance(image_id, str) and image_id.strip().isdigit())):
            raise DataError(f"{path}, line {n}: image_id {image_id!r} is not an integer COCO image id.")
        if not isinstance(row["caption"], str):
            raise DataError(f"{path}, line {n}: caption is a {type(row['caption']).__name__}, not a string.")
        rows.append({**row, "image_id": int(image_id), **({"_line": n} if keep_line else {})})
    if not rows:
        raise DataError(f"{path} holds no captions; {CAPTIONS_HINT}.")
    return rows


def chair(captions, dataset: CocoDataset, tokenizer=None, synonyms: str | Path | dict[str, str] | None = None,
          singular_fixes: bool | None = None, flavour: str = "reference", normalise_synonyms: bool | None = None,
          length: str | None = None) -> ChairResult:
    """Score captions with CHAIR: the one way captions are scored in lens_halluc.

    Parameters
    ----------
    captions : a :class:`~lens_halluc.generation.Captions`, a list of row dicts (``image_id``,
        ``caption``, optionally ``token_ids``) or ``(image_id, caption)`` pairs, or the path of a
        captions JSONL file.
    dataset : the captioned images' :class:`CocoDataset` (ground truth; its ``probes`` if any).
    tokenizer : optional; aligns every mention to its token (needs ``token_ids`` in the rows).
    flavour : ``"reference"`` (default; ``LisaAnne/Hallucination`` ``utils/chair.py``) or
        ``"corrected"`` (normalised synonym table, the bus/ties fix, Len in words); see
        :class:`ChairEvaluator`, which also documents ``synonyms``, ``singular_fixes``,
        ``normalise_synonyms`` and ``length`` (None = the flavour's value).

    Returns
    -------
    A :class:`ChairResult`; ``.summary`` holds ``CHAIR_s``, ``CHAIR_i``, ``Recall``, ``Len``,
    ``repeat_rate`` (:func:`repeated_object_rate`), ``partner_rate`` and ``other_absent_rate``
    when ``dataset.probes`` is not empty (:func:`partner_rates`), and ``n`` (captions);
    ``.per_caption`` is a DataFrame.

    Example
    -------
    >>> ds = CocoDataset.from_dicts(
    ...     {"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 18, "name": "dog"}],
    ...      "annotations": [{"image_id": 1, "category_id": 18}]})
    >>> chair([{"image_id": 1, "caption": "Two dogs and a cat."}], ds).summary
    {'CHAIR_s': 1.0, 'CHAIR_i': 0.5, 'Recall': 1.0, 'Len': 6.0, 'repeat_rate': 0.0, 'n': 1}
    """
    if isinstance(captions, (str, Path)):
        records: Any = read_captions(captions)
    else:
        records = list(getattr(captions, "rows", captions))
    evaluator = ChairEvaluator(synonyms=synonyms, singular_fixes=singular_fixes, flavour=flavour,
                               normalise_synonyms=normalise_synonyms, length=length)
    result = evaluator.evaluate(records, dataset, tokenizer)
    summary = dict(result.summary)
    summary["repeat_rate"] = repeated_object_rate(result.captions)
    probes = dict(getattr(dataset, "probes", None) or {})
    if probes:
        summary.update(partner_rates(result.captions, probes))
    summary["n"] = len(result.captions)
    return ChairResult(summary, result.captions, probes)
