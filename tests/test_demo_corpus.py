"""The generated demo pair: determinism, agreement, word order, several valid translations.

The expected target sentences below are written from the language's rules as
stated here (articles l-/un-, endings o/a/e/i/as/en, plural suffixes en/er/a,
verb endings a/an/ato and e/en/ito, auxiliary ha/han), not from the renderer.
"""

import random
import re

import pytest

from rest_jax.data import demo_corpus as dc

ENDING = {("m", "sg"): "o", ("f", "sg"): "a", ("n", "sg"): "e",
          ("m", "pl"): "i", ("f", "pl"): "as", ("n", "pl"): "en"}
PLURAL = {"m": "en", "f": "er", "n": "a"}
PRESENT = {"a": {"sg": "a", "pl": "an"}, "i": {"sg": "e", "pl": "en"}}
PARTICIPLE = {"a": "ato", "i": "ito"}


@pytest.fixture(scope="module")
def lex():
    return dc.lexicon()


@pytest.fixture(scope="module")
def sample():
    return dc.generate_pairs({"train": 600, "validation": 50, "test": 50}, seed=11)


def _single(table, pred=lambda k: True):
    return [k for k, v in table.items() if len(v) == 1 and pred(k)]


def _form(lex, lemma, kind):
    return next(f for f, (l, k) in lex.verb_forms.items() if l == lemma and k == kind)


def test_hand_built_sentence_has_exactly_the_expected_translation(lex):
    noun1, noun2 = _single(lex.nouns)[:2]
    adj = _single(lex.adjectives)[0]
    verb = _single(lex.verbs, lambda v: lex.verb_kind[v] == "trans")[0]
    n1, n2 = lex.nouns[noun1][0], lex.nouns[noun2][0]
    v = lex.verbs[verb][0]
    source = f"The {adj} {noun1} {_form(lex, verb, '3sg')} two {lex.noun_plural[noun2]}."
    expected = (
        f"L{ENDING[(n1.gender, 'sg')]} {n1.stem} {lex.adjectives[adj][0]}{ENDING[(n1.gender, 'sg')]} "
        f"{v.stem}{PRESENT[v.verb_class]['sg']} du {n2.stem}{PLURAL[n2.gender]}."
    )
    assert dc.all_valid_translations(source) == [expected]
    assert dc.is_valid_translation(source, expected)
    # A wrong gender ending is not a translation.
    wrong = expected.replace(f" {n2.stem}{PLURAL[n2.gender]}", f" {n2.stem}{PLURAL[{'m': 'f', 'f': 'n', 'n': 'm'}[n2.gender]]}")
    assert not dc.is_valid_translation(source, wrong)


def test_past_subordinate_clause_is_verb_final_and_may_come_first(lex):
    subj = _single(lex.nouns)[0]
    obj_a, obj_b = _single(lex.nouns)[1:3]
    sleep = _single(lex.verbs, lambda v: lex.verb_kind[v] == "intrans")[0]
    see = _single(lex.verbs, lambda v: lex.verb_kind[v] == "trans")[0]
    s, a, b = lex.nouns[subj][0], lex.nouns[obj_a][0], lex.nouns[obj_b][0]
    vs, vt = lex.verbs[sleep][0], lex.verbs[see][0]
    source = (f"The {subj} {_form(lex, sleep, 'past')} because the {lex.noun_plural[obj_a]} "
              f"{_form(lex, see, 'past')} a {obj_b}.")
    main = f"l{ENDING[(s.gender, 'sg')]} {s.stem} ha {vs.stem}{PARTICIPLE[vs.verb_class]}"
    inverted = f"ha l{ENDING[(s.gender, 'sg')]} {s.stem} {vs.stem}{PARTICIPLE[vs.verb_class]}"
    expected = set()
    for because in ("perke", "kar"):  # Two synonyms.
        sub = (f"{because} l{ENDING[(a.gender, 'pl')]} {a.stem}{PLURAL[a.gender]} "
               f"un{ENDING[(b.gender, 'sg')]} {b.stem} {vt.stem}{PARTICIPLE[vt.verb_class]} han")
        expected.add(main[0].upper() + main[1:] + ", " + sub + ".")
        expected.add(sub[0].upper() + sub[1:] + ", " + inverted + ".")
    assert set(dc.all_valid_translations(source)) == expected


def test_fronted_time_adverb_moves_the_verb_before_the_subject(lex):
    noun = _single(lex.nouns)[0]
    verb = _single(lex.verbs, lambda v: lex.verb_kind[v] == "intrans")[0]
    n, v = lex.nouns[noun][0], lex.verbs[verb][0]
    source = f"My {lex.noun_plural[noun]} {verb} now."
    det = f"mi{ENDING[(n.gender, 'pl')]}"
    word = f"{v.stem}{PRESENT[v.verb_class]['pl']}"
    pl = f"{n.stem}{PLURAL[n.gender]}"
    assert set(dc.all_valid_translations(source)) == {
        f"{det.capitalize()} {pl} {word} nun.", f"Nun {word} {det} {pl}."
    }


def test_generation_is_deterministic_for_a_seed_and_splits_are_disjoint(sample):
    again = dc.generate_pairs({"train": 600, "validation": 50, "test": 50}, seed=11)
    other = dc.generate_pairs({"train": 600, "validation": 50, "test": 50}, seed=12)
    assert again == sample
    assert other["train"] != sample["train"]
    sources = [{s for s, _ in sample[split]} for split in ("train", "validation", "test")]
    assert sum(len(s) for s in sources) == 700  # No source twice, within or across splits.
    assert len(set.union(*sources)) == 700


def test_every_reference_is_valid_and_lengths_in_range(sample):
    for source, target in sample["validation"] + sample["test"]:
        assert dc.is_valid_translation(source, target), (source, target)
    lengths = [len(re.findall(r"\w+", s)) for s, _ in sample["train"]]
    assert min(lengths) >= 5 and max(lengths) <= 25
    assert max(lengths) >= 20 and min(lengths) <= 7  # Varied lengths, not one template.


def test_agreement_holds_in_every_noun_phrase(lex, sample):
    nouns = {}  # target noun form -> (gender, number)
    for translations in lex.nouns.values():
        for n in translations:
            nouns[n.stem], nouns[n.stem + PLURAL[n.gender]] = (n.gender, "sg"), (n.gender, "pl")
    agreeing_dets = {"l", "un", "kelk", "ist", "mi", "tu", "mult"}
    adj_stems = {a for adjs in lex.adjectives.values() for a in adjs}
    checked = 0
    for _, target in sample["train"]:
        words = re.findall(r"\w+", target.lower())
        for i, w in enumerate(words):
            if w not in nouns:
                continue
            ending = ENDING[nouns[w]]
            det = words[i - 1]
            assert det in ("du", "tri", "kvar") or (det.endswith(ending) and det[: -len(ending)] in agreeing_dets), target
            for adj in words[i + 1:i + 3]:
                if any(adj == a + e for a in adj_stems for e in ENDING.values()):
                    assert adj.endswith(ending) and adj[: -len(ending)] in adj_stems, target
            checked += 1
    assert checked > 1000


def test_word_order_differs_from_the_source(sample):
    # Past tense: the auxiliary comes early, the participle ends the clause.
    finals = 0
    for source, target in sample["train"]:
        clauses = re.split(r"[,.]| e ", target)  # Clauses end at punctuation or "and".
        for clause in clauses:
            words = clause.split()
            if "ha" in words[:-1] or "han" in words[:-1]:
                # Auxiliary inside a main clause: a participle (…ato / …ito) ends it.
                if words[-1] not in ("ha", "han"):
                    assert re.search(r"(ato|ito)$", words[-1]), (source, target)
                    finals += 1
    assert finals > 50
    # Not a copy: target words almost never appear in the source.
    src_words = {w.lower() for s, _ in sample["train"] for w in re.findall(r"\w+", s)}
    tgt_words = [w.lower() for _, t in sample["train"] for w in re.findall(r"\w+", t)]
    assert sum(w in src_words for w in tgt_words) / len(tgt_words) < 0.05


def test_one_source_has_several_references(sample):
    rng = random.Random(0)
    several = 0
    for source, _ in sample["test"][:30]:
        meaning = dc.parse_source(source)
        refs = {dc.sample_translation(meaning, rng) for _ in range(20)}
        assert refs <= set(dc.all_valid_translations(source))
        several += len(refs) > 1
    assert several >= 25  # Nearly every sentence has more than one correct translation.


def test_parser_inverts_rendering_and_rejects_other_text():
    rng = random.Random(5)
    for _ in range(300):
        meaning = dc.sample_sentence(rng)
        assert dc.parse_source(dc.render_source(meaning)) == meaning
    with pytest.raises(ValueError, match="Not a sentence of the demo source language"):
        dc.parse_source("The dog see a cat.")  # Agreement error.
    with pytest.raises(ValueError, match="Not a sentence"):
        dc.parse_source("Hello world.")


def test_vocabulary_has_hundreds_of_words(sample):
    src = {w for s, _ in sample["train"] for w in re.findall(r"\w+", s.lower())}
    tgt = {w for _, t in sample["train"] for w in re.findall(r"\w+", t.lower())}
    assert len(src) > 300 and len(tgt) > 500


def test_write_corpus_files_and_reuse(tmp_path):
    folder = str(tmp_path / "demo")
    files = dc.ensure_corpus(folder, train_size=30, validation_size=4, test_size=3, seed=2)
    lines = {s: open(files[s][0]).read().splitlines() for s in dc.SPLITS}
    assert {s: len(v) for s, v in lines.items()} == {"train": 30, "validation": 4, "test": 3}
    assert dc.corpus_exists(folder, train_size=30, validation_size=4, test_size=3, seed=2)
    assert not dc.corpus_exists(folder, train_size=30, validation_size=4, test_size=3, seed=3)
    pairs = dc.generate_pairs({"train": 30, "validation": 4, "test": 3}, seed=2)
    assert lines["train"] == [s for s, _ in pairs["train"]]
    assert open(files["test"][1]).read().splitlines() == [t for _, t in pairs["test"]]
