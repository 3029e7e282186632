"""Make ``tests/data/chair_reference.jsonl.gz``: the CHAIR reference's own outputs on generated captions.

The reference is ``LisaAnne/Hallucination`` ``utils/chair.py`` (Python 2) run in Python 3: the
only edits are the four ``print`` statements and ``from misc import *`` (which only supplies
``os``; ``misc`` itself is Python 2), applied as exact string replacements that must each match
once (see :func:`python3_port`). Its ``from pattern.en import singularize`` gets Pattern 3.6's
real ``singularize`` (``pattern/text/en/inflect.py`` of the Pattern 3.6 source; importing all of
``pattern.en`` would try to download WordNet, so only that module is imported). ``nltk`` is the
installed one, reading the ``punkt_tab`` English model from ``--punkt-tab``. Nothing of this is
installed into the project or committed; only the outputs are.

    # the reference checkout (e.g. git archive of github.com/LisaAnne/Hallucination) and Pattern 3.6:
    python -m pip download lib-pattern==3.6 --no-deps --no-binary :all: -d /tmp/pat   # Pattern 3.6 sdist
    python bench/chair_reference.py --reference /tmp/Hallucination \\
        --pattern /tmp/pat/lib_pattern-3.6 --punkt-tab /tmp/nltk_data/tokenizers/punkt_tab/english

``--check`` instead scores the fixture with lens_halluc (or with ``--module``, a copy of an older
``lens_halluc/data/chair.py``) and prints how many captions agree:

    python bench/chair_reference.py --check                       # the current reference flavour
    python bench/chair_reference.py --check --module /tmp/chair_old.py --flavour none

The captions are generated (seeded) to exercise every synonym entry (the odd ones too), plural
and irregular forms, every two-word phrase and special rule, toilet/seat, punctuation (curly and
straight quotes, ``!``/``?``, ``.!``, ellipses, dashes, brackets), abbreviations, numbers, case,
whitespace, non-ASCII letters and repeats. One caption per image (the reference's input format is
keyed by image); each image gets instance categories and 0-3 reference captions, so the ground
truth also goes through the reference's caption pipeline.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import io
import json
import os
import random
import shutil
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "chair_reference.jsonl.gz"
SYNONYMS = ROOT / "lens_halluc" / "data" / "resources" / "chair_synonyms.txt"

# ------------------------------------------------------------------------------- generator
IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
             "goose": "geese", "ox": "oxen", "knife": "knives", "policeman": "policemen", "sheep": "sheep",
             "calf": "calves", "wolf": "wolves", "bus": "buses", "glass": "glasses", "foot": "feet",
             "tooth": "teeth", "lady": "ladies", "puppy": "puppies", "doggie": "doggies", "ski": "skis",
             "tie": "ties", "pony": "ponies", "shelf": "shelves", "leaf": "leaves", "cactus": "cacti",
             "fish": "fish", "deer": "deer", "bison": "bison", "scissors": "scissors", "boy": "boys",
             "toy": "toys", "cattle": "cattle", "couch": "couches", "bench": "benches", "box": "boxes"}
ODD_PLURALS = ["busses", "knifes", "childs", "mans", "mouses", "sheeps", "teddys", "hot dogs'", "dogs'",
               "bus'", "people's", "women's", "cupcakess", "skiss", "tvs", "tv's", "suv", "suvs", "iphones",
               "i-phone", "cell-phones", "hot-dogs", "teddy-bear", "baby-elephant", "motor-bike"]
DISTRACTORS = ["tree", "grass", "sky", "street", "building", "window", "wall", "water", "glass", "plate",
               "road", "field", "room", "shirt", "hat", "fence", "table cloth", "floor", "kitchen", "beach",
               "snow", "wave", "tennis", "bu", "ties", "news", "series", "species", "glasses", "dress",
               "grass", "bus stop", "train station", "train tracks", "home plate", "stove top oven",
               "motor", "baby", "adult", "passenger", "toilet paper", "seat belt", "wine", "hot", "teddy",
               "cell", "traffic", "stop", "fire", "parking", "suit", "sports", "baseball", "potted",
               "laptop", "bow", "dining", "hair", "mobile", "street", "air", "mr.", "dr.", "st.",
               "e.g.", "i.e.", "u.s.", "a.m.", "no.", "3.5", "1,000", "10:30", "$5", "50%", "#1",
               "café", "naïve", "straße", "İstanbul", "ÉCOLE", "ﬁsh", "σοφός", "jalapeño", "o'clock",
               "rock'n'roll", "mothers-in-law", "cat-like", "self-driving", "x-ray", "t-shirt"]
ADJECTIVES = ["red", "small", "large", "white", "old", "wooden", "two", "three", "many", "some", "a few",
              "several", "black", "young", "happy", "big", "little", "shiny", "plastic", "empty"]
VERBS = ["sits on", "stands next to", "holds", "rides", "eats", "is near", "looks at", "is beside",
         "lies under", "walks past", "carries", "is in front of", "plays with", "waits for", "can't see",
         "cannot reach", "won't leave", "is gonna eat", "wanna ride", "'s next to", "are on", "with"]
DETS = ["a", "the", "an", "this", "that", "two", "some", "my", "his", "her", "their", "no", ""]
QUALIFIED = ([f"{q} {a}" for q in ("baby", "adult") for a in
              ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")]
             + ["passenger jet", "passenger train", "passenger jets", "passenger trains", "bow tie", "bow ties",
                "toilet seat", "toilet seats", "wine glass", "wine glasses", "train track", "train tracks",
                "home plate", "stove top oven", "dining table", "dining tables", "motor bike", "motor bikes",
                "motor cycle", "motor cycles", "air plane", "hot dog", "hot dogs", "teddy bear", "teddy bears",
                "hair drier", "hair driers", "cell phone", "mobile phones", "sports ball", "tennis racket",
                "baseball bat", "baseball glove", "stop sign", "stop light", "street light", "traffic light",
                "traffic signal", "fire hydrant", "parking meter", "suit case", "potted plant",
                "laptop computer", "adult baby elephant", "passenger train track", "baby passenger jet",
                "wine wine glass", "toilet toilet seat", "hot hot dog", "bow bow tie"])


def synonym_entries() -> list[tuple[str, str]]:
    """(entry as written in the file, node word) for every entry, odd ones included."""
    out = []
    for line in SYNONYMS.read_text(encoding="utf-8").splitlines():
        entries = line.split(",")
        node = entries[0].strip()
        out += [(e, node) for e in entries if e.strip()]
    return out


def plural(word: str) -> str:
    head, _, last = word.rpartition(" ")
    if last in IRREGULAR:
        p = IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        p = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        p = last[:-1] + "ies"
    elif last.endswith("fe"):
        p = last[:-2] + "ves"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def cased(rng: random.Random, text: str) -> str:
    r = rng.random()
    if r < 0.70:
        return text
    if r < 0.82:
        return text.title()
    if r < 0.90:
        return text.upper()
    if r < 0.95:
        return text.capitalize()
    return "".join(c.upper() if rng.random() < 0.4 else c for c in text)


class Generator:
    """Seeded captions; every synonym entry appears, most in several forms."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.entries = synonym_entries()
        self.nodes = list(dict.fromkeys(node for _, node in self.entries))
        self._queue: list[str] = []
        self.plain = False  # plain captions: no decoration, simple punctuation (as a captioner writes)

    def _surface(self, entry: str) -> str:
        rng = self.rng
        e = entry if rng.random() < 0.15 else entry.strip()  # the raw entry keeps its stray space sometimes
        r = rng.random()
        if r < 0.35:
            return plural(e.strip()) if e == e.strip() else e
        if r < 0.40:
            return rng.choice(ODD_PLURALS)
        return e

    def noun_phrase(self) -> str:
        rng = self.rng
        r = rng.random()
        if r < 0.55:
            if not self._queue:  # cycle through every entry, in a shuffled order
                self._queue = [e for e, _ in self.entries]
                rng.shuffle(self._queue)
            word = self._surface(self._queue.pop())
        elif r < 0.75:
            q = rng.choice(QUALIFIED)
            word = plural(q) if rng.random() < 0.2 else q
        else:
            word = rng.choice(DISTRACTORS)
        if rng.random() < 0.3:
            word = f"{rng.choice(ADJECTIVES)} {word}"
        if rng.random() < 0.08:
            word = rng.choice(["", "the "]) + word + rng.choice(["'s", "'", "s'", "’s"])
        det = rng.choice(DETS)
        np = f"{det} {word}" if det else word
        return self._decorate(np)

    def _decorate(self, np: str) -> str:
        rng = self.rng
        r = rng.random()
        if self.plain:
            return np
        if r < 0.04:
            return f"“{np}”"
        if r < 0.07:
            return f'"{np}"'
        if r < 0.09:
            return f"‘{np}’"
        if r < 0.11:
            return f"'{np}'"
        if r < 0.13:
            return f"``{np}''"
        if r < 0.16:
            return f"({np})"
        if r < 0.18:
            return f"[{np}]"
        if r < 0.19:
            return f"{{{np}}}"
        if r < 0.20:
            return f"<{np}>"
        if r < 0.23:  # glue punctuation with no space
            return np + rng.choice([".", ",", "/", "-", ".", ":", ";", "!", "?", "'"]) + rng.choice(
                ["cat", "dog", "table", "x", "3", "and"])
        return np

    def sentence(self) -> str:
        rng = self.rng
        parts = [self.noun_phrase()]
        for _ in range(rng.choice([1, 1, 1, 2, 2, 3])):
            joiner = rng.choice([f" {rng.choice(VERBS)} ", ", ", " and ", " -- ", " – ", " — ", "; ", ": ",
                                 " & ", " or ", ", and ", " with ", " ... ", "...", " (and ", ")", " * "])
            parts.append(joiner + self.noun_phrase())
        if self.plain:
            text = "".join(parts)
            return (text[:1].upper() + text[1:] if rng.random() < 0.7 else text) + rng.choice([".", ".", " .", "!", ","])
        if rng.random() < 0.15:  # repeats
            parts.append(", " + ", ".join([parts[0]] * rng.randint(1, 3)))
        text = cased(rng, "".join(parts))
        if rng.random() < 0.1:
            text = rng.choice(["There is ", "There are ", "I see ", "In this image, ", "Mr. Smith has ",
                               "Dr. Who sees ", "St. Louis: ", "e.g. ", "No. 5 is ", "The sign reads “",
                               "A. B. Smith holds ", "It's ", "He said, \"", "“", "'", "("]) + text
        end = rng.choice([".", ".", ".", ".", "!", "?", "...", ".!", "?!", "!!", ". .", "", " .", ".”",
                          ".\"", ".'", ".’", ".)", ".]", "!”", "?\"", ".”)", ",", ":", " ;", "…", "!?",
                          ". ”", "\u00a0.", ".\n", "?)", "'.", "”."])
        return text + end

    def caption(self) -> str:
        rng = self.rng
        self.plain = rng.random() < 0.35
        if self.plain:
            return " ".join(self.sentence() for _ in range(rng.choice([1, 2, 2, 3, 4])))
        sep = lambda: rng.choice([" ", " ", " ", "  ", "\n", "\t", " \n ", ""])  # noqa: E731
        text = self.sentence()
        for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
            text += sep() + self.sentence()
        return rng.choice(["", "", "", " ", "\n"]) + text + rng.choice(["", "", "", " ", "\n"])

    def dataset(self, n: int) -> tuple[list[dict], list[dict]]:
        """``images`` (id, categories, references) and ``captions`` (image_id, caption), one per image."""
        rng = self.rng
        images, captions = [], []
        for k in range(n):
            image_id = 1000 + k * 7
            caption = self.caption()
            cats = rng.sample(self.nodes, rng.choice([0, 1, 1, 2, 3, 3, 4, 5, 8]))
            # nodes the caption names (by the raw table) are often present, so not every mention is a hallucination
            low = caption.lower()
            cats += [node for e, node in self.entries if e.strip() and e.strip().lower() in low and rng.random() < 0.5]
            refs = [self.caption() if rng.random() < 0.5 else self.sentence() for _ in range(rng.choice([0, 0, 1, 2, 3]))]
            images.append({"id": image_id, "categories": sorted(set(cats)), "references": refs})
            captions.append({"image_id": image_id, "caption": caption})
        return images, captions


# --------------------------------------------------------------------------- the reference
PORT_EDITS = [  # (Python 2 text, Python 3 text): each must occur exactly once in utils/chair.py
    ("from misc import *\n", "import os\n"),
    ('        print "\\n"\n        for imid in self.imid_to_objects:\n            self.imid_to_objects[imid] = set(self.imid_to_objects[imid])\n\n    def get_annotations_from_captions',
     '        print("\\n")\n        for imid in self.imid_to_objects:\n            self.imid_to_objects[imid] = set(self.imid_to_objects[imid])\n\n    def get_annotations_from_captions'),
    ('                self.imid_to_objects[imid].update(node_words)\n        print "\\n"\n',
     '                self.imid_to_objects[imid].update(node_words)\n        print("\\n")\n'),
    ('        print "SPICE\\tMETEOR\\tCIDEr\\tCHAIRs\\tCHAIRi"\n        print metric_string\n',
     '        print("SPICE\\tMETEOR\\tCIDEr\\tCHAIRs\\tCHAIRi")\n        print(metric_string)\n'),
]


def python3_port(source: str) -> str:
    """The reference script with only the Python-2-only lines changed (each edit must match once)."""
    for old, new in PORT_EDITS:
        if source.count(old) != 1:
            raise SystemExit(f"the reference's utils/chair.py is not the expected version: {old!r} found "
                             f"{source.count(old)} times")
        source = source.replace(old, new)
    return source


def load_pattern_singularize(pattern_root: Path):
    """Pattern 3.6's ``singularize`` from its source tree (``pattern/text/en/inflect.py``)."""
    sys.path.insert(0, str(pattern_root))
    import pattern.text  # noqa: F401  (pattern.text itself imports fine offline)

    en_dir = pattern_root / "pattern" / "text" / "en"
    en = types.ModuleType("pattern.text.en")
    en.__path__ = [str(en_dir)]  # a bare package: its __init__ would download WordNet
    sys.modules["pattern.text.en"] = en
    from pattern.text.en.inflect import singularize

    return singularize


def run_reference(ref_root: Path, pattern_root: Path, punkt_dir: Path, images: list[dict], captions: list[dict]):
    singularize = load_pattern_singularize(pattern_root)
    pattern_en = types.ModuleType("pattern.en")
    pattern_en.singularize = singularize  # what `from pattern.en import singularize` gives
    sys.modules["pattern.en"] = pattern_en

    import nltk

    work = Path(tempfile.mkdtemp(prefix="chair_ref_"))
    try:
        data = work / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
        data.mkdir(parents=True)
        for f in ("abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"):
            shutil.copy(punkt_dir / f, data / f)
        nltk.data.path[:] = [str(work / "nltk_data")]

        coco = work / "coco"
        coco.mkdir()
        names = sorted({c for im in images for c in im["categories"]})
        cat_id = {n: k + 1 for k, n in enumerate(names)}
        inst = {"info": {}, "licenses": [], "categories": [{"id": cat_id[n], "name": n} for n in names],
                "images": [{"id": im["id"], "file_name": f"{im['id']}.jpg"} for im in images],
                "annotations": [{"id": k, "image_id": im["id"], "category_id": cat_id[c]}
                                for k, (im, c) in enumerate((im, c) for im in images for c in im["categories"])]}
        caps = {"info": {}, "licenses": [], "images": inst["images"],
                "annotations": [{"id": k, "image_id": im["id"], "caption": r}
                                for k, (im, r) in enumerate((im, r) for im in images for r in im["references"])]}
        empty = {"info": {}, "licenses": [], "categories": inst["categories"], "images": [], "annotations": []}
        for name, obj in (("instances_val2014", inst), ("captions_val2014", caps), ("instances_train2014", empty),
                          ("captions_train2014", empty)):
            (coco / f"{name}.json").write_text(json.dumps(obj))
        metrics = dict.fromkeys(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "CIDEr", "SPICE", "ROUGE_L"], 0.0)
        cap_file = work / "captions.json"
        cap_file.write_text(json.dumps({"overall": metrics, "imgToEval": {
            str(c["image_id"]): {**metrics, "image_id": c["image_id"], "caption": c["caption"]} for c in captions}}))

        source = python3_port((ref_root / "utils" / "chair.py").read_text())
        module = types.ModuleType("reference_chair")
        module.__file__ = str(ref_root / "utils" / "chair.py")
        cwd = os.getcwd()
        os.chdir(ref_root)  # it reads data/synonyms.txt relative to the working directory
        try:
            exec(compile(source, module.__file__, "exec"), module.__dict__)
            evaluator = module.CHAIR([c["image_id"] for c in captions], str(coco))
            with contextlib.redirect_stdout(io.StringIO()):
                evaluator.get_annotations()
                output = evaluator.compute_chair(str(cap_file))
            per_caption = []
            by_id = {s["image_id"]: s for s in output["sentences"]}
            for c in captions:
                s = by_id[c["image_id"]]
                words, node_words, _idxs, raw_words = evaluator.caption_to_words(c["caption"])
                assert node_words == s["mscoco_generated_words"]
                per_caption.append({
                    "image_id": c["image_id"], "caption": c["caption"],
                    "tokens": nltk.word_tokenize(c["caption"].lower()),
                    "words": words, "mentioned": node_words,
                    "hallucinated": [node for _, node in s["mscoco_hallucinated_words"]],
                    "n_tokens": len(raw_words), "ground_truth": sorted(s["mscoco_gt_words"]),
                    "CHAIRi": s["metrics"]["CHAIRi"],
                })
            vocab = sorted({t for c in captions for t in nltk.word_tokenize(c["caption"].lower())}
                           | {t for im in images for r in im["references"] for t in nltk.word_tokenize(r.lower())})
            singular = {t: singularize(t) for t in vocab}
        finally:
            os.chdir(cwd)
        overall = output["overall_metrics"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Recall and Len are not in this script; computed from its per-caption outputs as the OPERA port
    # of it does (Recall: sum |generated & gt| / sum |gt|; Len: mean len(raw words), stored x 0.01).
    recalled = sum(len(set(c["mentioned"]) & set(c["ground_truth"])) for c in per_caption)
    truth = sum(len(c["ground_truth"]) for c in per_caption)
    summary = {"CHAIR_s": overall["CHAIRs"], "CHAIR_i": overall["CHAIRi"], "Recall": recalled / truth,
               "Len": sum(c["n_tokens"] for c in per_caption) / len(per_caption)}
    return per_caption, summary, singular


def write_fixture(path: Path, meta: dict, images, per_caption, summary, singular) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        f.write(json.dumps({"kind": "meta", **meta}) + "\n")
        for im in images:
            f.write(json.dumps({"kind": "image", **im}, ensure_ascii=False) + "\n")
        for c in per_caption:
            f.write(json.dumps({"kind": "caption", **c}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"kind": "singular", "pairs": singular}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"kind": "summary", **summary}) + "\n")


def read_fixture(path: Path = FIXTURE) -> dict:
    out: dict = {"images": [], "captions": []}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            kind = row.pop("kind")
            if kind in ("image", "caption"):
                out[kind + "s"].append(row)
            elif kind == "singular":
                out["singular"] = row["pairs"]
            else:
                out[kind] = row
    return out


# ------------------------------------------------------------------------------- checking
def check(path: Path, module_path: str | None, flavour: str | None) -> None:
    """Score the fixture with lens_halluc (or an older copy of its chair module) and count agreement."""
    from lens_halluc.data.coco import CocoDataset

    if module_path:
        spec = importlib.util.spec_from_file_location("lens_halluc.data._chair_under_test", module_path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    else:
        import lens_halluc.data.chair as mod
    fx = read_fixture(path)
    ds = CocoDataset.from_dicts(*fixture_dicts(fx))
    ev = mod.ChairEvaluator() if flavour in (None, "none") else mod.ChairEvaluator(flavour=flavour)
    res = ev.evaluate([(c["image_id"], c["caption"]) for c in fx["captions"]], ds)
    same_objects = same_all = 0
    first = None
    for ref, ours in zip(fx["captions"], res.captions):
        objects_ok = ref["mentioned"] == ours["mentioned"] and ref["hallucinated"] == ours["hallucinated"]
        length_ok = ev.caption_length(ref["caption"]) == ref["n_tokens"]
        same_objects += objects_ok
        same_all += objects_ok and length_ok and sorted(ours["ground_truth"]) == ref["ground_truth"]
        if not objects_ok and first is None:
            first = (ref["caption"], ref["mentioned"], ours["mentioned"])
    n = len(fx["captions"])
    print(f"{same_objects} of {n} captions agree on mentioned + hallucinated objects; "
          f"{same_all} of {n} also on ground truth and Len tokens")
    print("reference summary:", fx["summary"])
    print("ours:             ", {k: res.summary[k] for k in fx["summary"]})
    if first:
        print("first disagreement:", first)


def fixture_dicts(fx: dict) -> tuple[dict, dict]:
    """COCO instances and captions dicts of the fixture's images (category ids by sorted name)."""
    names = sorted({c for im in fx["images"] for c in im["categories"]})
    cat_id = {n: k + 1 for k, n in enumerate(names)}
    inst = {"images": [{"id": im["id"], "file_name": f"{im['id']}.jpg"} for im in fx["images"]],
            "categories": [{"id": cat_id[n], "name": n} for n in names],
            "annotations": [{"id": k, "image_id": i, "category_id": cat_id[c]} for k, (i, c) in enumerate(
                (im["id"], c) for im in fx["images"] for c in im["categories"])]}
    caps = {"annotations": [{"id": k, "image_id": i, "caption": r} for k, (i, r) in enumerate(
        (im["id"], r) for im in fx["images"] for r in im["references"])]}
    return inst, caps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, help="checkout of LisaAnne/Hallucination (has utils/chair.py)")
    p.add_argument("--pattern", type=Path, help="Pattern 3.6 source tree (has pattern/text/en/inflect.py)")
    p.add_argument("--punkt-tab", type=Path, help="nltk_data's tokenizers/punkt_tab/english directory")
    p.add_argument("--out", type=Path, default=FIXTURE)
    p.add_argument("--n", type=int, default=4000, help="generated captions (one image each)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--check", action="store_true", help="score the fixture with lens_halluc and count agreement")
    p.add_argument("--module", default=None, help="with --check: path of a chair.py to test instead")
    p.add_argument("--flavour", default=None, help="with --check: flavour to pass (none = the module's default)")
    args = p.parse_args(argv)
    if args.check:
        check(args.out, args.module, args.flavour)
        return
    if not (args.reference and args.pattern and args.punkt_tab):
        p.error("--reference, --pattern and --punkt-tab are needed to run the reference (or pass --check)")
    import nltk

    images, captions = Generator(args.seed).dataset(args.n)
    per_caption, summary, singular = run_reference(args.reference, args.pattern, args.punkt_tab, images, captions)
    meta = {"reference": "LisaAnne/Hallucination utils/chair.py (Python 3 port: print, misc import)",
            "singularize": "Pattern 3.6 pattern/text/en/inflect.py", "nltk": nltk.__version__,
            "seed": args.seed, "n": args.n, "made_by": "bench/chair_reference.py"}
    write_fixture(args.out, meta, images, per_caption, summary, singular)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): {len(per_caption)} captions, "
          f"{len(singular)} distinct tokens; reference summary {summary}")


if __name__ == "__main__":
    main()
