"""CHAIR: every matching rule on hand-worked captions, the metrics on a toy dataset, token alignment
with word-level and subword tokenizers, and the CLI (fast: toy data, tokenizers trained in-test)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from lens_halluc.data import CocoDataset, DataError
from lens_halluc.data.chair import (
    ChairEvaluator,
    Mention,
    align_mentions,
    load_synonyms,
    singularize,
    word_spans,
)


@pytest.fixture(scope="module")
def ev() -> ChairEvaluator:
    return ChairEvaluator()


def objects(ev: ChairEvaluator, caption: str) -> list[tuple[str, str]]:
    return [(m.word, m.node) for m in ev.caption_objects(caption)]


# ------------------------------------------------------------------------- synonym table
def test_synonym_table_reference_parse():
    # the reference: line.strip().split(", "); odd entries are kept as written and never match
    syn = load_synonyms()
    assert len(set(syn.values())) == 80 and len(syn) == 403
    assert syn[" motor bike"] == "motorcycle" and "motor bike" not in syn
    assert syn[" cheesecake"] == "cake" and "cheesecake" not in syn
    assert syn["iPhone"] == "cell phone" and "iphone" not in syn
    assert syn["bison"] == "cow"              # "bison " at the end of the line: strip() removes it
    assert syn["motor cycle"] == "motorcycle" and syn["people"] == "person"


def test_synonym_table_reference_parse_later_line_wins(tmp_path):
    table = tmp_path / "syn.txt"
    table.write_text("dog, puppy\ncat, puppy, kit,ten\n")
    assert load_synonyms(table) == {"dog": "dog", "puppy": "cat", "cat": "cat", "kit,ten": "cat"}


def test_synonym_table_is_normalised():
    syn = load_synonyms(flavour="corrected")
    assert len(set(syn.values())) == 80
    assert syn["motor bike"] == "motorcycle"  # " motor bike" in the file (stray space)
    assert syn["cheesecake"] == "cake"        # "cake,  cheesecake"
    assert syn["bison"] == "cow"              # "bison " (trailing space)
    assert syn["iphone"] == "cell phone"      # "iPhone"
    assert syn["skis"] == syn["ski"] == "skis"
    assert all(k == k.strip().lower() and "  " not in k for k in syn)


def test_synonym_table_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_synonyms(tmp_path / "nope.txt")
    bad = tmp_path / "syn.txt"
    bad.write_text("dog, puppy\ncat, puppy\n")
    with pytest.raises(DataError, match="line 2.*'puppy'"):
        load_synonyms(bad, flavour="corrected")
    custom = tmp_path / "custom.txt"
    custom.write_text("widget, gadget\n")
    assert objects(ChairEvaluator(custom), "Two gadgets and a widget.") == [("gadgets", "widget"), ("widget", "widget")]


# -------------------------------------------------------------------------- tokenisation
@pytest.mark.parametrize("text, tokens", [
    ("A dog's bowl, two cats.", ["a", "dog", "'s", "bowl", ",", "two", "cats", "."]),
    ("There are dogs. A cat!", ["there", "are", "dogs", ".", "a", "cat", "!"]),   # mid-text period split
    ("3.5 kg, 1,000 birds (or so)", ["3.5", "kg", ",", "1,000", "birds", "(", "or", "so", ")"]),
    ('the "hot dog" stand', ["the", "``", "hot", "dog", "''", "stand"]),           # NLTK's quote tokens
    ("a ''dog'' here", ["a", "``", "dog", "''", "here"]),
    ("the dogs' owner can't", ["the", "dogs", "'", "owner", "ca", "n't"]),
    ("a dog.cat", ["a", "dog.cat"]),                                              # no space: one token
    ("there is a fork .", ["there", "is", "a", "fork", "."]),
])
def test_word_spans_match_nltk(text, tokens):
    spans = word_spans(text)
    assert [t for t, _, _ in spans] == tokens
    # the span is the token's original text; a double quote token covers the quote characters
    assert all(text[a:b].lower() == t or (t in ("``", "''") and text[a:b] in ('"', "''", "``"))
               for t, a, b in spans)


def test_word_spans_map_back_through_lengthening_lower_case():
    text = "İ saw a DOG."  # "İ".lower() is two characters
    assert [(t, text[a:b]) for t, a, b in word_spans(text)] == [
        ("i̇", "İ"), ("saw", "saw"), ("a", "a"), ("dog", "DOG"), (".", ".")]


# ------------------------------------------------------------------------ singularisation
@pytest.mark.parametrize("plural, singular", [
    ("men", "man"), ("women", "woman"), ("policemen", "policeman"), ("mice", "mouse"), ("knives", "knife"),
    ("children", "child"), ("people", "person"), ("teeth", "tooth"), ("feet", "foot"), ("geese", "goose"),
    ("oxen", "ox"), ("calves", "calf"), ("wolves", "wolf"), ("ladies", "lady"), ("puppies", "puppy"),
    ("benches", "bench"), ("buses", "bus"), ("boxes", "box"), ("tomatoes", "tomato"), ("gloves", "glove"),
    ("giraffes", "giraffe"), ("sheep", "sheep"), ("scissors", "scissors"), ("skis", "ski"),
    ("glasses", "glass"),
    # pattern.en slips the reference inherits:
    ("glass", "glas"), ("bus", "bu"), ("ties", "ty"), ("doggies", "doggies"), ("tennis", "tenni"),
])
def test_singularize_matches_pattern(plural, singular):
    assert singularize(plural) == singular


# --------------------------------------------------------------------------------- rules
def test_irregular_plurals(ev):
    assert objects(ev, "Two men, three mice, some knives and children.") == [
        ("men", "person"), ("mice", "mouse"), ("knives", "knife"), ("children", "person")]
    assert objects(ev, "Women and people near geese and oxen.") == [
        ("Women", "person"), ("people", "person"), ("geese", "bird"), ("oxen", "cow")]


def test_two_word_merges(ev):
    assert objects(ev, "A hot dog by a stop sign under a traffic light.") == [
        ("hot dog", "hot dog"), ("stop sign", "stop sign"), ("traffic light", "traffic light")]
    # merging happens after singularisation; the span covers the whole phrase
    (m,) = ev.caption_objects("Two teddy bears.")
    assert (m.word, m.node, m.char_start, m.char_end) == ("teddy bears", "teddy bear", 4, 15)
    assert objects(ev, "a hot dog") == [("hot dog", "hot dog")]   # not also "dog"
    assert objects(ev, "hot, dog") == [("dog", "dog")]            # punctuation blocks a merge
    assert objects(ev, "a motor bike") == []  # reference: the table's entry is " motor bike"
    assert objects(ChairEvaluator(flavour="corrected"), "a motor bike") == [("motor bike", "motorcycle")]
    # "train track" merges into a non-object, so only the first train counts
    assert objects(ev, "A train on the train tracks.") == [("train", "train")]


def test_merges_are_greedy_left_to_right(ev):
    # "passenger train" is taken first, so "train track" never forms and the train is found.
    assert objects(ev, "a passenger train track") == [("train", "train")]
    # "adult baby" is no phrase: "adult" stays (person), then "baby elephant" -> elephant.
    assert objects(ev, "an adult baby elephant") == [("adult", "person"), ("elephant", "elephant")]


def test_baby_and_adult_animals_are_not_persons(ev):
    # the mention is the animal word the reference keeps, so its span and token are the animal's
    ms = ev.caption_objects("A baby elephant and an adult giraffe.")
    assert [(m.word, m.node, m.char_start) for m in ms] == [("elephant", "elephant", 7), ("giraffe", "giraffe", 29)]
    assert objects(ev, "Two baby cats.") == [("cats", "cat")]
    assert objects(ev, "A baby in a crib.") == [("baby", "person")]
    assert objects(ev, "a baby cub") == []  # "cub" is no COCO word


def test_passenger_jet_and_train(ev):
    assert objects(ev, "A passenger jet and a passenger train.") == [("jet", "airplane"), ("train", "train")]
    assert objects(ev, "A passenger on a train.") == [("passenger", "person"), ("train", "train")]


def test_bow_tie_toilet_seat_wine_glass(ev):
    assert objects(ev, "A man in a bow tie.") == [("man", "person"), ("tie", "tie")]  # one mention, not bow + tie
    assert objects(ev, "a bow") == [("bow", "tie")]
    assert objects(ev, "The toilet seat is up.") == [("toilet", "toilet")]  # no chair
    assert objects(ev, "A wine glass and two wine glasses.") == [
        ("wine glass", "wine glass"), ("wine glasses", "wine glass")]
    assert objects(ev, "a glass of wine") == []  # "glass" singularises to "glas", no COCO word


def test_seat_dropped_when_toilet_present(ev):
    assert objects(ev, "The seat of the toilet.") == [("toilet", "toilet")]
    assert objects(ev, "A seat, a toilet and another seat.") == [("toilet", "toilet")]
    assert objects(ev, "A seat by the window.") == [("seat", "chair")]
    # the rule tests the word "toilet" itself, as in the reference: a urinal does not drop seats
    assert objects(ev, "A seat next to a urinal.") == [("seat", "chair"), ("urinal", "toilet")]


def test_mentions_keep_order_repeats_and_spans(ev):
    cap = "A Dog, a cat, and another dog."
    ms = ev.caption_objects(cap)
    assert [(m.node, m.char_start, m.char_end) for m in ms] == [("dog", 2, 5), ("cat", 9, 12), ("dog", 26, 29)]
    assert [cap[m.char_start:m.char_end] for m in ms] == ["Dog", "cat", "dog"]
    assert all(m.token_position is None for m in ms)


def test_reference_slips_and_the_fix_option(ev):
    assert objects(ev, "A bus and two bow ties.") == [("bow", "tie")]  # reference: "bu", "bow ty"
    fixed = ChairEvaluator(singular_fixes=True)
    assert objects(fixed, "A bus and two bow ties.") == [("bus", "bus"), ("ties", "tie")]
    assert objects(fixed, "Two buses and a wine glass.") == [("buses", "bus"), ("wine glass", "wine glass")]


# --------------------------------------------------------------------------- toy dataset
# Image 1: person, dog, car; reference "A man walks a dog on a leash." (no new object).
# Image 2: knife, dining table; reference adds fork.  Image 3: toilet; reference "a toilet with the
# seat up" adds nothing (seat dropped).  Image 4: cat, no reference.
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"},
              {"id": 17, "name": "cat"}, {"id": 49, "name": "knife"}, {"id": 67, "name": "dining table"},
              {"id": 70, "name": "toilet"}]
ANNOTATIONS = {1: [1, 18, 3, 1], 2: [49, 67], 3: [70], 4: [17]}
REFERENCES = {1: ["A man walks a dog on a leash."], 2: ["Knives on a table next to a fork."],
              3: ["a toilet with the seat up"]}
CAPTIONS = [
    (1, "A man and two dogs sit next to a cat."),          # person dog cat*          10 words
    (2, "Two knives, a fork and a knife on the table."),   # knife fork knife table  10 words
    (3, "A toilet seat and a chair, a bow tie and a chair."),  # toilet chair* tie* chair*  12 words
]


def toy_dicts():
    instances = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in ANNOTATIONS],
        "categories": CATEGORIES,
        "annotations": [{"id": k, "image_id": i, "category_id": c}
                        for k, (i, c) in enumerate((i, c) for i, cs in ANNOTATIONS.items() for c in cs)],
    }
    captions = {"annotations": [{"id": k, "image_id": i, "caption": c}
                                for k, (i, c) in enumerate((i, c) for i, cs in REFERENCES.items() for c in cs)]}
    return instances, captions


@pytest.fixture()
def toy(tmp_path):
    instances, captions = toy_dicts()
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs.json").write_text(json.dumps(captions))
    (tmp_path / "caps.jsonl").write_text(
        "".join(json.dumps({"image_id": i, "caption": c, "extra": 1}) + "\n" for i, c in CAPTIONS))
    return tmp_path


@pytest.fixture()
def toy_ds():
    return CocoDataset.from_dicts(*toy_dicts())


def test_ground_truth_unites_instances_and_references(ev, toy_ds):
    assert ev.ground_truth(toy_ds, 1) == {"person", "dog", "car"}
    assert ev.ground_truth(toy_ds, 2) == {"knife", "dining table", "fork"}  # fork from the reference
    assert ev.ground_truth(toy_ds, 3) == {"toilet"}                        # "seat" dropped
    assert ev.ground_truth(toy_ds, 4) == {"cat"}                           # no reference caption
    with pytest.raises(DataError, match="image id 99"):
        ev.ground_truth(toy_ds, 99)


def test_ground_truth_is_cached_per_dataset(toy_ds):
    ev = ChairEvaluator()
    first = ev.ground_truth(toy_ds, 2)
    toy_ds.captions[2].append("a cat")          # a cached image ignores later edits...
    assert ev.ground_truth(toy_ds, 2) is first
    other = CocoDataset.from_dicts(*toy_dicts())
    other.captions[2].append("a cat")           # ...but another dataset gets its own truth
    assert "cat" in ev.ground_truth(other, 2)


def test_unknown_category_name_is_a_clear_error():
    inst = {"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 1, "name": "gizmo"}],
            "annotations": [{"image_id": 1, "category_id": 1}]}
    with pytest.raises(DataError, match="'gizmo'.*--synonyms"):
        ChairEvaluator().ground_truth(CocoDataset.from_dicts(inst), 1)


def test_metrics_hand_computed(ev, toy_ds):
    res = ev.evaluate(CAPTIONS, toy_ds)
    # mentions 3 + 4 + 4 = 11, hallucinated 1 + 0 + 3 = 4 (the repeated chair counts twice)
    assert res.summary["CHAIR_i"] == pytest.approx(4 / 11)
    assert res.summary["CHAIR_s"] == pytest.approx(2 / 3)
    # |{person,dog,cat} & {person,dog,car}| = 2, |{knife,fork,dining table}| = 3, |{toilet,chair,tie} & {toilet}| = 1
    assert res.summary["Recall"] == pytest.approx(Fraction(2 + 3 + 1, 3 + 3 + 1))
    # Len (reference): tokens after the merges, punctuation included: 11, 12 (", ." count) and 12
    # ("toilet seat" and "bow tie" are one token each)
    assert res.summary["Len"] == pytest.approx((11 + 12 + 12) / 3)
    corrected = ChairEvaluator(flavour="corrected").evaluate(CAPTIONS, toy_ds).summary
    assert corrected["Len"] == pytest.approx((10 + 10 + 12) / 3)  # words, before merging
    assert {k: corrected[k] for k in ("CHAIR_s", "CHAIR_i", "Recall")} == {
        k: res.summary[k] for k in ("CHAIR_s", "CHAIR_i", "Recall")}  # no odd word in these captions
    c1, c2, c3 = res.captions
    assert c1["mentioned"] == ["person", "dog", "cat"] and c1["hallucinated"] == ["cat"]
    assert c2["mentioned"] == ["knife", "fork", "knife", "dining table"] and c2["hallucinated"] == []
    assert c3["mentioned"] == ["toilet", "chair", "tie", "chair"]
    assert c3["hallucinated"] == ["chair", "tie", "chair"]
    assert c3["ground_truth"] == ["toilet"] and c1["ground_truth"] == ["car", "dog", "person"]
    assert c3["mentions"][2] == {"word": "tie", "node": "tie", "char_start": 33, "char_end": 36,
                                 "token_position": None, "hallucinated": True}
    assert set(res.to_dict()) == {"summary", "captions"}
    # dict records give the same result
    dicts = [{"image_id": i, "caption": c} for i, c in CAPTIONS]
    assert ev.evaluate(dicts, toy_ds).summary == res.summary


def test_evaluate_input_errors(ev, toy_ds):
    with pytest.raises(DataError, match=r"not in the instances file.*\[42\]"):
        ev.evaluate([(42, "a dog")], toy_ds)
    with pytest.raises(ValueError, match="no captions"):
        ev.evaluate([], toy_ds)
    with pytest.raises(ValueError, match="caption #0 lacks"):
        ev.evaluate([{"image_id": 1}], toy_ds)
    with pytest.raises(ValueError, match="without a tokenizer"):
        ev.evaluate(CAPTIONS, toy_ds, token_ids=[[1], [2], [3]])


# ---------------------------------------------------------------------- token alignment
def word_level_tokenizer(words, clean_up: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=clean_up)


CORPUS = ["two elephants and a baby zebra near a hot dog.", "a man with knives at a table.",
          "people and elephants walk near zebras and a dog."]


def bpe_tokenizer(byte_level: bool):
    """A tiny BPE (few merges, so words split in several pieces): SentencePiece-like or GPT-2-like."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        alphabet, size = pre_tokenizers.ByteLevel.alphabet(), 268
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet, size = [], 45
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_align_word_level(ev):
    caption = "two men and a hot dog near the knives ."
    tok = word_level_tokenizer(caption.split())
    ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(caption.split()) + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == caption
    ms = ev.caption_objects(caption)
    assert [m.word for m in ms] == ["men", "hot dog", "knives"]
    # ids: 0 <s>, 1 two, 2 men, 3 and, 4 a, 5 hot, 6 dog, 7 near, 8 the, 9 knives, 10 ., 11 </s>
    assert align_mentions(ms, caption, ids, tok) == [2, 5, 9]


def test_align_word_level_with_cleanup_and_the_package_tokenizer(ev):
    words = "two men , a dog .".split()
    tok = word_level_tokenizer(words, clean_up=True)  # decodes "two men, a dog." (no space before , .)
    ids = tok.convert_tokens_to_ids(words)
    caption = tok.decode(ids, skip_special_tokens=True)
    assert caption == "two men, a dog."
    assert align_mentions(ev.caption_objects(caption), caption, ids, tok) == [1, 4]

    from lens_halluc.models.wordlevel import build_word_tokenizer

    tok = build_word_tokenizer(["there", "are", "two", "knives", "and", "a", "cup", "."])
    ids = tok("There are two knives and a cup.").input_ids  # <s> there are two knives and a cup .
    caption = tok.decode(ids, skip_special_tokens=True)
    assert caption == "there are two knives and a cup ."
    assert align_mentions(ev.caption_objects(caption), caption, ids, tok) == [4, 7]


@pytest.mark.parametrize("byte_level", [False, True], ids=["sentencepiece-like", "byte-level"])
def test_align_subword(ev, byte_level):
    tok = bpe_tokenizer(byte_level)
    text = CORPUS[0]
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    decoded = tok.decode(ids, skip_special_tokens=True)
    caption = decoded.strip()  # the caption runner stores the stripped decoding
    assert caption == text
    pieces = tok.convert_ids_to_tokens(ids)
    marker = "Ġ" if byte_level else "▁"
    starts = [i for i, p in enumerate(pieces) if p.startswith(marker)]  # word starts, from the pieces alone
    assert len(starts) == len(text.split()) and len(pieces) > len(starts) + 3, pieces  # words are split
    assert starts[2] - starts[1] > 2, pieces  # "elephants" has several pieces
    # A lone marker piece ("▁" then "ele") holds only the space: the word's first letter is in the next.
    starts = [i + 1 if pieces[i] == marker else i for i in starts]
    ms = ev.caption_objects(caption)
    assert [(m.word, m.node) for m in ms] == [("elephants", "elephant"), ("zebra", "zebra"), ("hot dog", "hot dog")]
    # words: two(0) elephants(1) and(2) a(3) baby(4) zebra(5) near(6) a(7) hot(8) dog.(9)
    expected = [starts[1], starts[5], starts[8]]
    assert align_mentions(ms, caption, ids, tok) == expected
    assert align_mentions(ms, caption, torch.tensor(ids), tok) == expected


def test_align_rejects_a_foreign_caption(ev):
    tok = word_level_tokenizer("a dog".split())
    ids = tok.convert_tokens_to_ids(["a", "dog"])
    with pytest.raises(ValueError, match="not the decoding"):
        align_mentions([Mention("cat", "cat", 2, 5)], "a cat", ids, tok)


def test_evaluate_fills_token_positions(ev, toy_ds):
    caption = "a man , two dogs and a cat ."
    tok = word_level_tokenizer(caption.split())
    ids = tok.convert_tokens_to_ids(caption.split())
    res = ev.evaluate([{"image_id": 1, "caption": caption, "token_ids": ids}], toy_ds, tokenizer=tok)
    ms = res.captions[0]["mentions"]
    assert [(m["node"], m["token_position"], m["hallucinated"]) for m in ms] == [
        ("person", 1, False), ("dog", 4, False), ("cat", 7, True)]
    # explicit token_ids override the records'; missing ids with a tokenizer is an error
    again = ev.evaluate([(1, caption)], toy_ds, tokenizer=tok, token_ids=[ids])
    assert again.captions[0]["mentions"] == ms
    with pytest.raises(ValueError, match="no token_ids"):
        ev.evaluate([(1, caption)], toy_ds, tokenizer=tok)


# ------------------------------------------------------------------------------------ CLI
def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lens_halluc.chair", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def test_cli_prints_summary_and_writes_details(toy):
    out = toy / "sub" / "chair.json"
    r = run_cli("--captions", toy / "caps.jsonl", "--instances", toy / "instances.json",
                "--references", toy / "refs.json", "--out", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary) == {"CHAIR_s", "CHAIR_i", "Recall", "Len"}
    assert summary["CHAIR_i"] == pytest.approx(4 / 11) and summary["CHAIR_s"] == pytest.approx(2 / 3)
    assert summary["Recall"] == pytest.approx(6 / 7) and summary["Len"] == pytest.approx(35 / 3)
    details = json.loads(out.read_text())
    assert details["summary"] == summary
    assert [c["hallucinated"] for c in details["captions"]] == [["cat"], [], ["chair", "tie", "chair"]]
    assert details["captions"][1]["mentions"][0] == {
        "word": "knives", "node": "knife", "char_start": 4, "char_end": 10, "token_position": None,
        "hallucinated": False}


def test_cli_token_positions_with_a_tokenizer(toy):
    caption = "a man , two dogs and a cat ."
    tok = word_level_tokenizer(caption.split())
    tok.save_pretrained(toy / "tok")
    ids = tok.convert_tokens_to_ids(caption.split())
    (toy / "caps.jsonl").write_text(json.dumps({"image_id": 1, "caption": caption, "token_ids": ids}) + "\n")
    out = toy / "chair.json"
    r = run_cli("--captions", toy / "caps.jsonl", "--instances", toy / "instances.json",
                "--references", toy / "refs.json", "--out", out, "--tokenizer", toy / "tok")
    assert r.returncode == 0, r.stderr
    mentions = json.loads(out.read_text())["captions"][0]["mentions"]
    assert [(m["word"], m["token_position"]) for m in mentions] == [("man", 1), ("dogs", 4), ("cat", 7)]


def test_cli_flavour(toy):
    (toy / "caps.jsonl").write_text(json.dumps({"image_id": 1, "caption": "A man on a bus with a motor bike."}) + "\n")
    base = ["--captions", toy / "caps.jsonl", "--instances", toy / "instances.json", "--references", toy / "refs.json",
            "--out", toy / "o.json"]

    def mentioned(*flags):
        r = run_cli(*base, *flags)
        assert r.returncode == 0, r.stderr
        return json.loads((toy / "o.json").read_text())["captions"][0]["mentioned"]

    assert mentioned() == ["person"]                                   # reference: "bu", " motor bike"
    assert mentioned("--flavour", "corrected") == ["person", "bus", "motorcycle"]
    assert mentioned("--flavour", "corrected", "--no-singular-fixes") == ["person", "motorcycle"]
    assert mentioned("--singular-fixes") == ["person", "bus"]
    r = run_cli(*base, "--flavour", "paper")
    assert r.returncode == 2 and "--flavour" in r.stderr


def test_flavour_parameters_resolve_and_rebuild():
    ev = ChairEvaluator()
    assert (ev.flavour, ev.normalise_synonyms, ev.singular_fixes, ev.length) == ("reference", False, False, "tokens")
    cor = ChairEvaluator(flavour="corrected")
    assert (cor.normalise_synonyms, cor.singular_fixes, cor.length) == (True, True, "words")
    mixed = ChairEvaluator(flavour="corrected", length="tokens")
    assert repr(mixed) == "ChairEvaluator(flavour='corrected', length='tokens')" and repr(ev) == "ChairEvaluator(flavour='reference')"
    again = ChairEvaluator(**mixed.get_params())
    assert again.get_params() == mixed.get_params()
    with pytest.raises(ValueError, match="flavour must be 'reference'"):
        ChairEvaluator(flavour="paper")
    with pytest.raises(ValueError, match="length must be one of"):
        ChairEvaluator(length="chars")


def test_category_names_are_looked_up_as_the_flavour_parses():
    inst = {"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 1, "name": "Dining  Table"}],
            "annotations": [{"image_id": 1, "category_id": 1}]}
    ds = CocoDataset.from_dicts(inst)
    with pytest.raises(DataError, match="'Dining  Table'"):
        ChairEvaluator().ground_truth(ds, 1)                       # the reference: exact name (KeyError there)
    assert ChairEvaluator(flavour="corrected").ground_truth(ds, 1) == {"dining table"}


def test_cli_help():
    r = run_cli("--help")
    assert r.returncode == 0 and "--references" in r.stdout and "CHAIR_i" in r.stdout


@pytest.mark.parametrize("lines, message", [
    (['{"image_id": 1, "caption": "a dog"}', '{"image_id": 2, "caption": '], r"caps.jsonl, line 2: not valid JSON"),
    (['{"image_id": 1}'], r"line 1: missing 'caption'"),
    (['[1, "a dog"]'], r"line 1: a JSON list, not an object"),
    (['{"image_id": "x1", "caption": "a dog"}'], r"line 1: image_id 'x1' is not an integer"),
    (['{"image_id": 1, "caption": "a dog"}', '{"image_id": 77, "caption": "a cat"}'],
     r"image ids that are not in .*instances.json \(first: image_id 77 on line 2"),
    ([], r"holds no captions"),
])
def test_cli_bad_captions(toy, lines, message):
    (toy / "caps.jsonl").write_text("\n".join(lines) + "\n")
    r = run_cli("--captions", toy / "caps.jsonl", "--instances", toy / "instances.json",
                "--references", toy / "refs.json")
    assert r.returncode == 2
    assert r.stderr.startswith("lens_halluc.chair: error:")
    assert re.search(message, r.stderr), r.stderr


def test_cli_missing_files(toy):
    r = run_cli("--captions", toy / "nope.jsonl", "--instances", toy / "instances.json", "--references", toy / "refs.json")
    assert r.returncode == 2 and "captions file not found" in r.stderr and "nope.jsonl" in r.stderr
    r = run_cli("--captions", toy / "caps.jsonl", "--instances", toy / "nope.json", "--references", toy / "refs.json")
    assert r.returncode == 2 and "instances file not found" in r.stderr
    r = run_cli("--captions", toy / "caps.jsonl", "--instances", toy / "instances.json", "--references", toy / "x.json")
    assert r.returncode == 2 and "captions file not found" in r.stderr and "x.json" in r.stderr
    r = run_cli("--captions", toy / "caps.jsonl", "--instances", toy / "instances.json")
    assert r.returncode == 2 and "--references" in r.stderr  # argparse: required option


def test_repeated_object_rate():
    from lens_halluc.data.chair import repeated_object_rate

    caps = [{"mentioned": ["dog", "dog", "cat"]}, {"mentioned": ["cat"]}, {"mentioned": []}, {"mentioned": ["a", "b"]}]
    assert repeated_object_rate(caps) == 0.25
    assert repeated_object_rate([]) == 0.0


def test_zero_mentions_give_zero(toy_ds):
    # the reference divides by the number of mentions (ZeroDivisionError); both flavours give 0.0
    for flavour in ("reference", "corrected"):
        summary = ChairEvaluator(flavour=flavour).evaluate([(1, "Nothing to see here.")], toy_ds).summary
        assert summary["CHAIR_i"] == 0.0 and summary["CHAIR_s"] == 0.0 and summary["Recall"] == 0.0
