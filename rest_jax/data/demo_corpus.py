"""A generated language pair for the demo: English-like source, invented target.

The demo runs behaviour cloning, Grow and Improve (ReST, Gulcehre et al. 2023,
arXiv 2308.08998, Algorithm 1) in minutes on a CPU, so it needs data that a
tiny Transformer learns only partly, with room for a reward to improve it. The
target language therefore differs from the source the way German or Italian
differ from English:

* lexical gender: every target noun is masculine, feminine or neuter, chosen
  at random, not visible in its form; its plural suffix depends on it;
* agreement: articles, demonstratives, possessives, "many"/"some" and
  adjectives agree with the noun in gender and number; verbs with the subject;
* word order: adjectives follow the noun; main clauses are verb-second (a
  fronted time adverb moves the verb before the subject); subordinate clauses
  are verb-final; the past is an auxiliary plus a clause-final participle;
* several valid translations: synonyms (some with another gender, so the
  agreement changes too), optional adverb fronting, subordinate clause before
  or after the main clause, "that"-clauses with or without the complementizer
  (verb-final with it, verb-second without), free order of two adjectives.
  Each reference is one of them drawn at random, so even a perfect system
  scores below 100 against the single reference.

Sentences have 5-25 source words; the vocabulary has several hundred word
forms on each side. Nothing is stored in the repository: `write_corpus` builds
the files from a seed. `all_valid_translations(source)` parses a source
sentence and lists every correct translation, to measure quality beyond the
single reference.

  python -m rest_jax.data.demo_corpus --output=/tmp/demo --seed=0
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import random
import re
import time
from typing import Callable, Optional, Sequence

import gin

from rest_jax.io import console

# ---------------------------------------------------------------------------
# Source lexicon (English-like). Surface forms of different words never
# coincide, so a source sentence has exactly one parse.
# ---------------------------------------------------------------------------

_NOUNS = (
    "man:men woman:women child:children boy girl baby:babies dog cat horse bird mouse:mice "
    "teacher doctor farmer king queen friend neighbour student baker soldier sailor painter "
    "singer driver table chair house car boat book letter apple cake cup bottle door window "
    "garden river mountain tree flower city:cities village street bridge school church:churches "
    "shop market park field forest lake ball hat coat shoe bag box:boxes key lamp picture song "
    "story:stories gift clock phone computer bicycle train ship island castle tower kitchen room "
    "bed wall stone egg banana orange cow goat rabbit wolf:wolves fox:foxes bear lion monkey "
    "elephant umbrella knife:knives leaf:leaves bus:buses"
).split()
_ADJECTIVES = (
    "big small old young new red blue green black white yellow happy sad tall short long "
    "beautiful ugly strong weak quiet loud clever kind angry hungry tired rich poor cold warm "
    "heavy dark bright dirty fast slow brave friendly strange famous empty full"
).split()
_TRANSITIVE = (
    "see:saw find:found buy:bought sell:sold build:built carry:carried paint:painted "
    "open:opened close:closed watch:watched like:liked love:loved visit:visited wash:washed "
    "write:wrote take:took bring:brought follow:followed help:helped call:called meet:met "
    "catch:caught hold:held push:pushed pull:pulled break:broke draw:drew hear:heard "
    "want:wanted teach:taught feed:fed kick:kicked touch:touched hide:hid steal:stole eat:ate "
    "need:needed forget:forgot throw:threw lose:lost choose:chose"
).split()
_INTRANSITIVE = (
    "sleep:slept run:ran sing:sang dance:danced laugh:laughed cry:cried wait:waited "
    "work:worked swim:swam walk:walked smile:smiled arrive:arrived fall:fell play:played "
    "jump:jumped sit:sat shout:shouted rest:rested"
).split()
_SAYING = "say:said think:thought believe:believed hope:hoped know:knew dream:dreamed".split()

# Target function words (fixed). Lists are synonyms: any is correct.
_PREPOSITIONS = {
    "in": ["en"], "on": ["sur"], "near": ["pres", "apud"], "behind": ["dor"], "under": ["sub"],
    "with": ["kun", "avek"], "without": ["sen"], "beside": ["flanke"],
}
_TIME = {
    "today": ["hodi"], "yesterday": ["ieri", "hieri"], "now": ["nun"], "often": ["ofte", "sovent"],
    "sometimes": ["foje"], "always": ["sempre"], "again": ["denove"],
}
_PAST_ONLY, _PRESENT_ONLY = {"yesterday"}, {"now"}
_SUBORDINATORS = {
    "because": ["perke", "kar"], "when": ["kiam"], "while": ["dum"], "although": ["kvankam"],
    "if": ["se"],
}
_COORDINATORS = {"and": ["e"], "but": ["ma", "sed"]}
_COMPLEMENTIZER = "ke"
_NEGATION = "ne"
_AUX = {"sg": "ha", "pl": "han"}

# Agreement endings for (gender, number); determiners and adjectives take them.
_AGR = {("m", "sg"): "o", ("f", "sg"): "a", ("n", "sg"): "e",
        ("m", "pl"): "i", ("f", "pl"): "as", ("n", "pl"): "en"}
_NOUN_PLURAL = {"m": "en", "f": "er", "n": "a"}
# Determiner -> (target stem taking _AGR or invariant word, allowed numbers).
_DETERMINERS = {
    "the": ("l", ("sg", "pl")), "a": ("un", ("sg",)), "some": ("kelk", ("pl",)),
    "this": ("ist", ("sg",)), "these": ("ist", ("pl",)), "my": ("mi", ("sg", "pl")),
    "your": ("tu", ("sg", "pl")), "many": ("mult", ("pl",)),
    "two": ("du", ("pl",)), "three": ("tri", ("pl",)), "four": ("kvar", ("pl",)),
}
_INVARIANT_DETERMINERS = {"two", "three", "four"}
_VERB_CLASSES = {"a": ("a", "an", "ato"), "i": ("e", "en", "ito")}  # pres sg, pres pl, participle

LANGUAGE_SEED = 2308  # Fixes the invented target words; corpus seeds only vary sentences.


def _split_forms(entry: str) -> tuple[str, str]:
    base, _, other = entry.partition(":")
    return base, other


def _plural(noun: str) -> str:
    if re.search(r"(s|x|ch|sh)$", noun):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


def _third_person(verb: str) -> str:
    if re.search(r"(s|x|z|ch|sh|o)$", verb):
        return verb + "es"
    if re.search(r"[^aeiou]y$", verb):
        return verb[:-1] + "ies"
    return verb + "s"


@dataclasses.dataclass(frozen=True)
class _TargetNoun:
    stem: str
    gender: str

    def form(self, number: str) -> str:
        return self.stem if number == "sg" else self.stem + _NOUN_PLURAL[self.gender]


@dataclasses.dataclass(frozen=True)
class _TargetVerb:
    stem: str
    verb_class: str

    def present(self, number: str) -> str:
        sg, pl, _ = _VERB_CLASSES[self.verb_class]
        return self.stem + (sg if number == "sg" else pl)

    def participle(self) -> str:
        return self.stem + _VERB_CLASSES[self.verb_class][2]


class Lexicon:
    """Both vocabularies and the source-form index used by the parser."""

    def __init__(self, seed: int = LANGUAGE_SEED, synonym_rate: float = 0.35):
        rng = random.Random(seed)
        taken = self.function_forms()

        def stems(n_syllables: Sequence[int], final_consonant: bool) -> str:
            while True:
                word = "".join(
                    rng.choice("bdfgklmnprstvz") + rng.choice("aeiou")
                    for _ in range(rng.choice(n_syllables))
                )
                if final_consonant or rng.random() < 0.5:
                    word += rng.choice("klmnrst")
                if word not in taken:
                    taken.add(word)
                    return word

        def synonyms(make):
            return [make() for _ in range(2 if rng.random() < synonym_rate else 1)]

        self.nouns: dict[str, list[_TargetNoun]] = {}
        self.noun_forms: dict[str, tuple[str, str]] = {}  # source form -> (lemma, number)
        self.noun_plural: dict[str, str] = {}
        for entry in _NOUNS:
            sg, pl = _split_forms(entry)
            pl = pl or _plural(sg)
            self.noun_plural[sg] = pl
            self.noun_forms[sg], self.noun_forms[pl] = (sg, "sg"), (sg, "pl")
            self.nouns[sg] = synonyms(lambda: _TargetNoun(stems((2, 2, 3), False), rng.choice("mfn")))
        self.adjectives = {a: synonyms(lambda: stems((1, 2, 2), True)) for a in _ADJECTIVES}
        self.verbs: dict[str, list[_TargetVerb]] = {}
        self.verb_kind: dict[str, str] = {}
        self.verb_forms: dict[str, tuple[str, str]] = {}  # source form -> (lemma, form kind)
        self.verb_past: dict[str, str] = {}
        for kind, entries in (("trans", _TRANSITIVE), ("intrans", _INTRANSITIVE), ("say", _SAYING)):
            for entry in entries:
                base, past = _split_forms(entry)
                self.verb_kind[base] = kind
                self.verb_past[base] = past
                self.verb_forms[base] = (base, "base")
                self.verb_forms[_third_person(base)] = (base, "3sg")
                self.verb_forms[past] = (base, "past")
                self.verbs[base] = synonyms(
                    lambda: _TargetVerb(stems((1, 2), True), rng.choice("ai"))
                )
        self._check_unambiguous()

    def _check_unambiguous(self) -> None:
        groups = [
            set(self.noun_forms), set(self.verb_forms), set(_ADJECTIVES), set(_DETERMINERS),
            {"an", "does", "do", "did", "not", "that"}, set(_PREPOSITIONS), set(_TIME),
            set(_SUBORDINATORS), set(_COORDINATORS),
        ]
        seen: set[str] = set()
        for g in groups:
            if seen & g:
                raise AssertionError(f"Ambiguous source forms: {sorted(seen & g)}")
            seen |= g
        content = self.content_forms()
        function = self.function_forms()
        if len(content) != len(set(content)) or set(content) & function:
            raise AssertionError("Ambiguous target forms")

    def content_forms(self) -> list[str]:
        """Target noun, verb and adjective forms (a list: duplicates would be a bug)."""
        forms = [f for ns in self.nouns.values() for n in ns for f in (n.form("sg"), n.form("pl"))]
        forms += [f for vs in self.verbs.values() for v in vs
                  for f in (v.present("sg"), v.present("pl"), v.participle())]
        forms += [a + e for adjs in self.adjectives.values() for a in adjs for e in _AGR.values()]
        return forms

    @staticmethod
    def function_forms() -> set[str]:
        """Target determiners, prepositions, conjunctions, adverbs and auxiliaries."""
        forms = {_COMPLEMENTIZER, _NEGATION, *_AUX.values()}
        for table in (_PREPOSITIONS, _TIME, _SUBORDINATORS, _COORDINATORS):
            forms.update(w for words in table.values() for w in words)
        for det, (stem, _) in _DETERMINERS.items():
            forms.update([stem] if det in _INVARIANT_DETERMINERS else [stem + e for e in _AGR.values()])
        return forms


_LEXICON: Optional[Lexicon] = None


def lexicon() -> Lexicon:
    """The fixed lexicon: the first seed from LANGUAGE_SEED on without clashing forms."""
    global _LEXICON
    seed = LANGUAGE_SEED
    while _LEXICON is None:
        try:
            _LEXICON = Lexicon(seed)
        except AssertionError as e:
            if "target" not in str(e):
                raise
            seed += 1
    return _LEXICON


# ---------------------------------------------------------------------------
# Meaning: what a sentence says. Source rendering is a function of it.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NounPhrase:
    noun: str  # Source lemma.
    number: str  # "sg" | "pl"
    determiner: str  # A key of _DETERMINERS.
    adjectives: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Clause:
    subject: NounPhrase
    verb: str  # Source lemma.
    tense: str  # "present" | "past"
    negated: bool = False
    obj: Optional[NounPhrase] = None  # Transitive verbs.
    complement: Optional["Clause"] = None  # Saying verbs: "that ..." clause.
    prep: Optional[str] = None
    prep_object: Optional[NounPhrase] = None
    time: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Sentence:
    main: Clause
    connective: Optional[str] = None  # Coordinator or subordinator.
    second: Optional[Clause] = None
    fronted: bool = False  # Source puts the subordinate clause first.


# ---------------------------------------------------------------------------
# Sampling meanings.
# ---------------------------------------------------------------------------


def _sample_np(rng: random.Random) -> NounPhrase:
    number = "pl" if rng.random() < 0.35 else "sg"
    dets = [d for d, (_, nums) in _DETERMINERS.items() if number in nums]
    weights = [{"the": 8, "a": 5, "some": 3, "many": 1}.get(d, 1.5) for d in dets]
    det = rng.choices(dets, weights)[0]
    n_adj = rng.choices((0, 1, 2), (55, 35, 10))[0]
    adjs = tuple(rng.sample(_ADJECTIVES, n_adj))
    return NounPhrase(rng.choice(list(lexicon().nouns)), number, det, adjs)


def _sample_clause(rng: random.Random, allow_complement: bool) -> Clause:
    lex = lexicon()
    kinds = ("trans", "intrans", "say") if allow_complement else ("trans", "intrans")
    kind = rng.choices(kinds, (60, 25, 15)[: len(kinds)])[0]
    verb = rng.choice([v for v, k in lex.verb_kind.items() if k == kind])
    tense = "past" if rng.random() < 0.45 else "present"
    clause = dict(subject=_sample_np(rng), verb=verb, tense=tense, negated=rng.random() < 0.15)
    if kind == "trans":
        clause["obj"] = _sample_np(rng)
    if kind == "say":
        # No PP or adverb of its own: "that ..." comes last, so they would be ambiguous.
        clause["complement"] = _sample_clause(rng, allow_complement=False)
        return Clause(**clause)
    if rng.random() < 0.3:
        clause["prep"] = rng.choice(list(_PREPOSITIONS))
        clause["prep_object"] = _sample_np(rng)
    if rng.random() < 0.25:
        excluded = _PRESENT_ONLY if tense == "past" else _PAST_ONLY
        clause["time"] = rng.choice([t for t in _TIME if t not in excluded])
    return Clause(**clause)


def sample_sentence(rng: random.Random, min_words: int = 5, max_words: int = 25) -> Sentence:
    """Draws a meaning whose source sentence has `min_words`..`max_words` words."""
    while True:
        kind = rng.choices(("single", "coord", "sub"), (45, 20, 35))[0]
        main = _sample_clause(rng, allow_complement=kind == "single")
        if kind == "single":
            sentence = Sentence(main)
        elif kind == "coord":
            sentence = Sentence(main, rng.choice(list(_COORDINATORS)), _sample_clause(rng, False))
        else:
            sentence = Sentence(
                main, rng.choice(list(_SUBORDINATORS)), _sample_clause(rng, False),
                fronted=rng.random() < 0.3,
            )
        n = len(_words(render_source(sentence)))
        if min_words <= n <= max_words:
            return sentence


# ---------------------------------------------------------------------------
# Source rendering and parsing.
# ---------------------------------------------------------------------------


def _np_source(np_: NounPhrase) -> list[str]:
    noun = np_.noun if np_.number == "sg" else lexicon().noun_plural[np_.noun]
    words = [*np_.adjectives, noun]
    det = np_.determiner
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return [det, *words]


def _verb_source(clause: Clause) -> list[str]:
    past = lexicon().verb_past[clause.verb]
    sg = clause.subject.number == "sg"
    if clause.negated:
        aux = "did" if clause.tense == "past" else ("does" if sg else "do")
        return [aux, "not", clause.verb]
    if clause.tense == "past":
        return [past]
    return [_third_person(clause.verb) if sg else clause.verb]


def _clause_source(clause: Clause) -> list[str]:
    words = _np_source(clause.subject) + _verb_source(clause)
    if clause.obj:
        words += _np_source(clause.obj)
    if clause.complement:
        words += ["that", *_clause_source(clause.complement)]
    if clause.prep:
        words += [clause.prep, *_np_source(clause.prep_object)]
    if clause.time:
        words.append(clause.time)
    return words


def _detokenize(tokens: list[str]) -> str:
    text = " ".join(tokens).replace(" ,", ",").replace(" .", ".")
    return text[0].upper() + text[1:]


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[\w']+|[,.]", text) if w not in ",."]


def render_source(sentence: Sentence) -> str:
    """The one source sentence that expresses `sentence`."""
    main = _clause_source(sentence.main)
    if sentence.connective is None:
        tokens = main
    else:
        second = _clause_source(sentence.second)
        if sentence.fronted:
            tokens = [sentence.connective, *second, ",", *main]
        else:
            comma = [","] if sentence.connective == "but" else []
            tokens = [*main, *comma, sentence.connective, *second]
    return _detokenize(tokens + ["."])


class _Parser:
    """Recursive descent over the source grammar; inverse of `render_source`."""

    def __init__(self, text: str):
        tokens = re.findall(r"[\w']+|[,.]", text.strip())
        if tokens:
            tokens[0] = tokens[0].lower()
        self.tokens, self.i, self.text = tokens, 0, text

    def fail(self, what: str):
        raise ValueError(
            f"Not a sentence of the demo source language: expected {what} at word {self.i + 1} "
            f"of {self.text!r}."
        )

    def peek(self) -> Optional[str]:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            self.fail("more words")
        self.i += 1
        return tok

    def noun_phrase(self) -> NounPhrase:
        lex = lexicon()
        det = self.take()
        det = "a" if det == "an" else det
        if det not in _DETERMINERS:
            self.fail("a determiner")
        adjs = []
        while self.peek() in _ADJECTIVES:
            adjs.append(self.take())
        noun = self.take()
        if noun not in lex.noun_forms:
            self.i -= 1
            self.fail("a noun")
        lemma, number = lex.noun_forms[noun]
        if number not in _DETERMINERS[det][1]:
            self.fail(f"a determiner that fits {noun!r}")
        return NounPhrase(lemma, number, det, tuple(adjs))

    def clause(self, allow_complement: bool) -> Clause:
        lex = lexicon()
        subject = self.noun_phrase()
        sg = subject.number == "sg"
        negated = False
        if self.peek() in ("does", "do", "did"):
            aux = self.take()
            agrees = aux == "did" or (aux == "does") == sg
            if self.take() != "not" or not agrees:
                self.fail("an auxiliary that agrees with the subject, then 'not'")
            negated, tense = True, "past" if aux == "did" else "present"
            verb = self.take()
            if lex.verb_forms.get(verb, ("", ""))[1] != "base":
                self.fail("a verb in its base form")
        else:
            form = self.take()
            if form not in lex.verb_forms:
                self.fail("a verb")
            verb, kind = lex.verb_forms[form]
            tense = "past" if kind == "past" else "present"
            if kind != "past" and (kind == "3sg") != sg:
                self.fail("a verb that agrees with the subject")
        clause = dict(subject=subject, verb=verb, tense=tense, negated=negated)
        kind = lex.verb_kind[verb]
        if kind == "trans":
            clause["obj"] = self.noun_phrase()
        elif kind == "say":
            if not allow_complement or self.take() != "that":
                self.fail("'that'")
            clause["complement"] = self.clause(allow_complement=False)
            return Clause(**clause)
        if self.peek() in _PREPOSITIONS:
            clause["prep"] = self.take()
            clause["prep_object"] = self.noun_phrase()
        if self.peek() in _TIME:
            clause["time"] = self.take()
        return Clause(**clause)

    def sentence(self) -> Sentence:
        if self.peek() in _SUBORDINATORS:
            conn = self.take()
            second = self.clause(False)
            if self.take() != ",":
                self.fail("','")
            result = Sentence(self.clause(False), conn, second, fronted=True)
        else:
            main = self.clause(True)
            if self.peek() == ",":
                self.take()
                if self.peek() != "but":
                    self.fail("'but'")
            if self.peek() in _COORDINATORS or self.peek() in _SUBORDINATORS:
                if main.complement:
                    self.fail("the end of the sentence")
                conn = self.take()
                result = Sentence(main, conn, self.clause(False))
            else:
                result = Sentence(main)
        if self.take() != "." or self.peek() is not None:
            self.fail("'.' ending the sentence")
        return result


def parse_source(text: str) -> Sentence:
    """The meaning of a source sentence; ValueError if it is not in the language."""
    return _Parser(text).sentence()


# ---------------------------------------------------------------------------
# Target rendering: every choice goes through `choose`, so one renderer serves
# both drawing a random reference and enumerating all translations.
# ---------------------------------------------------------------------------

Choose = Callable[[Sequence], object]


def _np_target(np_: NounPhrase, choose: Choose) -> list[str]:
    lex = lexicon()
    noun = choose(lex.nouns[np_.noun])
    agr = _AGR[(noun.gender, np_.number)]
    stem = _DETERMINERS[np_.determiner][0]
    det = stem if np_.determiner in _INVARIANT_DETERMINERS else stem + agr
    adjs = [choose(lex.adjectives[a]) + agr for a in np_.adjectives]
    if len(adjs) == 2 and choose((False, True)):
        adjs.reverse()
    return [det, noun.form(np_.number), *adjs]


def _clause_target(clause: Clause, role: str, choose: Choose) -> list[str]:
    """role: "main" (verb second), "inverted" (verb first: after a fronted
    subordinate clause) or "sub" (verb final)."""
    verb = choose(lexicon().verbs[clause.verb])
    number = clause.subject.number
    if clause.tense == "past":
        finite, participle = [_AUX[number]], [verb.participle()]
    else:
        finite, participle = [verb.present(number)], []
    subject = _np_target(clause.subject, choose)
    neg = [_NEGATION] if clause.negated else []
    middle = _np_target(clause.obj, choose) if clause.obj else []
    if clause.prep:
        middle += [choose(_PREPOSITIONS[clause.prep]), *_np_target(clause.prep_object, choose)]
    time = [choose(_TIME[clause.time])] if clause.time else []
    complement = []
    if clause.complement:
        if choose((True, False)):
            complement = [",", _COMPLEMENTIZER, *_clause_target(clause.complement, "sub", choose)]
        else:
            complement = [",", *_clause_target(clause.complement, "main", choose)]
    if role == "sub":
        return [*subject, *time, *neg, *middle, *participle, *finite, *complement]
    if role == "inverted":
        return [*finite, *subject, *neg, *middle, *time, *participle, *complement]
    if time and choose((False, True)):
        return [*time, *finite, *subject, *neg, *middle, *participle, *complement]
    return [*subject, *finite, *neg, *middle, *time, *participle, *complement]


def _sentence_target(sentence: Sentence, choose: Choose) -> str:
    conn = sentence.connective
    if conn is None:
        tokens = _clause_target(sentence.main, "main", choose)
    elif conn in _COORDINATORS:
        word = choose(_COORDINATORS[conn])
        comma = [","] if conn == "but" else []
        tokens = [*_clause_target(sentence.main, "main", choose), *comma, word,
                  *_clause_target(sentence.second, "main", choose)]
    else:
        word = choose(_SUBORDINATORS[conn])
        sub = [word, *_clause_target(sentence.second, "sub", choose)]
        if choose((False, True)):
            tokens = [*sub, ",", *_clause_target(sentence.main, "inverted", choose)]
        else:
            tokens = [*_clause_target(sentence.main, "main", choose), ",", *sub]
    return _detokenize(tokens + ["."])


def sample_translation(sentence: Sentence, rng: random.Random) -> str:
    """One correct translation, every choice drawn uniformly."""
    return _sentence_target(sentence, rng.choice)


def _enumerate(render: Callable[[Choose], str], limit: int) -> list[str]:
    """All outputs of `render` over its choice tree (depth-first), at most `limit`."""
    results: dict[str, None] = {}
    stack: list[tuple[int, ...]] = [()]
    while stack and len(results) < limit:
        path = stack.pop()
        trace: list[tuple[int, int]] = []

        def choose(options: Sequence, path=path, trace=trace):
            k = len(trace)
            idx = path[k] if k < len(path) else 0
            trace.append((idx, len(options)))
            return options[idx]

        results[render(choose)] = None
        prefix = tuple(idx for idx, _ in trace)
        for k in range(len(trace) - 1, len(path) - 1, -1):
            for alt in range(1, trace[k][1]):
                stack.append(prefix[:k] + (alt,))
    return list(results)


def all_valid_translations(source: str, limit: int = 10_000) -> list[str]:
    """Every correct target sentence for `source` (at most `limit`)."""
    sentence = parse_source(source)
    return _enumerate(lambda choose: _sentence_target(sentence, choose), limit)


def is_valid_translation(source: str, candidate: str) -> bool:
    """Whether `candidate` (whitespace-normalised) is a correct translation."""
    candidate = " ".join(candidate.split())
    return candidate in set(all_valid_translations(source))


# ---------------------------------------------------------------------------
# Corpus files.
# ---------------------------------------------------------------------------

SPLITS = ("train", "validation", "test")
_META = "meta.json"
_FORMAT_VERSION = 1


def split_files(data_dir: str) -> dict[str, tuple[str, str]]:
    """split -> (source file, target file) inside `data_dir`."""
    return {s: (os.path.join(data_dir, f"{s}.src"), os.path.join(data_dir, f"{s}.tgt")) for s in SPLITS}


def generate_pairs(sizes: dict[str, int], seed: int) -> dict[str, list[tuple[str, str]]]:
    """(source, reference) pairs per split; no source occurs in two splits or twice."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = {}
    # Held-out splits first, so their sources are excluded from training.
    for split in ("validation", "test", "train"):
        pairs = []
        while len(pairs) < sizes[split]:
            sentence = sample_sentence(rng)
            source = render_source(sentence)
            if source in seen:
                continue
            seen.add(source)
            pairs.append((source, sample_translation(sentence, rng)))
        out[split] = pairs
    return {s: out[s] for s in SPLITS}


def _metadata(sizes: dict[str, int], seed: int) -> dict:
    return {"format_version": _FORMAT_VERSION, "language_seed": LANGUAGE_SEED, "seed": seed,
            "sizes": sizes}


def write_corpus(
    data_dir: str,
    train_size: int = 20_000,
    validation_size: int = 500,
    test_size: int = 500,
    seed: int = 0,
) -> dict[str, tuple[str, str]]:
    """Writes {train,validation,test}.{src,tgt} and meta.json into `data_dir`.

    Each file is written under a temporary name and renamed; meta.json, written
    last, marks a complete corpus.
    """
    from rest_jax.data import text_files

    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    os.makedirs(data_dir, exist_ok=True)
    files = split_files(data_dir)
    for split, pairs in generate_pairs(sizes, seed).items():
        text_files.write_lines(files[split][0], [s for s, _ in pairs])
        text_files.write_lines(files[split][1], [t for _, t in pairs])
    meta_path = os.path.join(data_dir, _META)
    with open(f"{meta_path}.tmp{os.getpid()}", "w") as f:
        json.dump(_metadata(sizes, seed), f, indent=2)
    os.replace(f"{meta_path}.tmp{os.getpid()}", meta_path)
    return files


def corpus_exists(data_dir: str, **settings) -> bool:
    """Whether `data_dir` holds a complete corpus (made with `settings` if given:
    train_size, validation_size, test_size, seed)."""
    try:
        with open(os.path.join(data_dir, _META)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    if not settings:
        return meta.get("format_version") == _FORMAT_VERSION
    seed = settings.pop("seed", 0)
    sizes = {s: settings.get(f"{s}_size", d) for s, d in
             (("train", 20_000), ("validation", 500), ("test", 500))}
    return meta == _metadata(sizes, seed)


@gin.configurable(denylist=["data_dir"])
def ensure_corpus(
    data_dir: str,
    train_size: int = 20_000,
    validation_size: int = 500,
    test_size: int = 500,
    seed: int = 0,
) -> dict[str, tuple[str, str]]:
    """Writes the corpus into `data_dir` unless one with these settings is there."""
    settings = dict(train_size=train_size, validation_size=validation_size, test_size=test_size,
                    seed=seed)
    if not corpus_exists(data_dir, **settings):
        started = time.perf_counter()
        write_corpus(data_dir, **settings)
        console.stage_done("demo corpus", time.perf_counter() - started,
                           f"{train_size}/{validation_size}/{test_size} train/validation/test pairs in {data_dir}")
    return split_files(data_dir)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write the generated demo corpus.")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_size", type=int, default=20_000)
    parser.add_argument("--validation_size", type=int, default=500)
    parser.add_argument("--test_size", type=int, default=500)
    args = parser.parse_args(argv)
    with console.quiet_native_stderr():  # the files are written through tf.io.gfile: TensorFlow's start-up lines
        importlib.import_module("rest_jax.data.text_files")
        console.start_tensorflow()
    files = write_corpus(args.output, args.train_size, args.validation_size, args.test_size, args.seed)
    for split, (src, tgt) in files.items():
        print(f"{split}: {src} {tgt}")
    with open(files["train"][0]) as fs, open(files["train"][1]) as ft:
        for _, s, t in zip(range(3), fs, ft):
            print(f"  {s.strip()}\n  -> {t.strip()}")


if __name__ == "__main__":
    main()
