"""The facts a sentence states about the synthetic benchmark's world, for the strict judge (eval/judges.py).

A reply or a gold answer is cut into claims (one per event it reports); a :class:`Claim` holds what kind of event
it reports, the colours and shapes it names, the count it gives, and whether it is negated::

    "A red star appeared."           -> kinds {appear}    colours {red}  shapes {star}
    "The star turned blue."          -> kinds {recolour}  colours {blue} shapes {star}   (the new colour only)
    "There are two objects."         -> kinds {count}     count 2
    "Two green stars."               -> kinds {}          colours {green} shapes {star} count 2
    "The red object is a star."      -> kinds {}          colours {red}  shapes {star}   (a description)
    "The red star left and a blue circle appeared."  -> two claims

One vocabulary: the colours and shapes are the generator's (eval/scenes.py), widened by the other colour and
shape words of English that eval/textnorm.py knows, so that "an orange star" is recognised as a wrong colour and
not skipped as an unknown word. The event kinds are the generator's (``benchmark.EVENT_KINDS``); this module only
adds the verbs that say each kind, so a paraphrase ("has just entered", "disappeared") reads the same as the
template ("appeared", "left").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import benchmark, scenes
from .textnorm import COLOURS as ENGLISH_COLOURS
from .textnorm import NUMBER_WORDS
from .textnorm import SHAPES as ENGLISH_SHAPES

COLOURS = frozenset(scenes.COLOUR_NAMES) | ENGLISH_COLOURS
SHAPES = frozenset(scenes.SHAPES) | ENGLISH_SHAPES
SYNONYMS = {"grey": "gray", "disc": "circle", "disk": "circle", "color": "colour"}
COUNT_KIND = "count"  # the kind of a claim that gives a number of objects and reports no event


def _forms(*bases: str) -> set[str]:
    """Regular verb forms: appear -> appear(s|ed|ing); move -> move(s|d), moving."""
    out = set()
    for b in bases:
        stem = b[:-1] if b.endswith("e") else b
        out |= {b, b + "s", stem + "ed", stem + "ing"}
    return out


# The words that report each event kind of the generator. "changed" reports a recolour only next to a colour word
# (see _kinds); "left" is a position, not a departure, after "the" ("moved to the left").
KIND_WORDS: dict[str, set[str]] = {
    "appear": _forms("appear", "enter", "arrive", "emerge", "reappear") | {"showed", "shows"},
    "leave": _forms("leave", "disappear", "exit", "vanish", "depart") | {"left", "gone", "went"},
    "recolour": _forms("turn", "recolour", "recolor") | {"became", "become", "becomes", "becoming"},
    "move": _forms("move", "slide", "drift", "travel") | {"slid"},
}
assert set(KIND_WORDS) == set(benchmark.EVENT_KINDS), "every event kind of the generator needs its verbs here"
CHANGE_WORDS = _forms("change")
NEGATIONS = frozenset("not no never nothing none nobody neither nor cannot".split())
GENERIC_NOUNS = frozenset("object objects thing things item items shape shapes".split())
NUMBERS = {w: int(d) for w, d in NUMBER_WORDS.items()} | {w: i for i, w in enumerate(benchmark.NUMBERS)}

_WORD = re.compile(r"[a-z0-9']+")
_SENTENCE = re.compile(r"[.!?;\n]+")
_JOINT = re.compile(r",|\b(?:and then|and|but|then|while)\b")


@dataclass(frozen=True)
class Claim:
    kinds: frozenset[str] = frozenset()  # event kinds (benchmark.EVENT_KINDS) or COUNT_KIND; empty: a description
    colours: frozenset[str] = frozenset()
    shapes: frozenset[str] = frozenset()
    count: int | None = None
    negated: bool = False

    def facts(self) -> set[tuple[str, object]]:
        """("kind", k), ("colour", c), ("shape", s), ("count", n): what this claim says."""
        out: set[tuple[str, object]] = {("kind", k) for k in self.kinds}
        out |= {("colour", c) for c in self.colours} | {("shape", s) for s in self.shapes}
        if self.count is not None:
            out.add(("count", self.count))
        return out


def _word(raw: str) -> str:
    w = SYNONYMS.get(raw, raw)
    if w not in SHAPES and w.endswith("s") and (w[:-1] in SHAPES or w[:-2] in SHAPES):  # stars, boxes
        w = w[:-1] if w[:-1] in SHAPES else w[:-2]
    return SYNONYMS.get(w, w)


def _words(text: str) -> list[str]:
    return [_word(w) for w in _WORD.findall(text.lower().replace("n't", " not"))]


def _kind_at(words: list[str], i: int) -> str | None:
    w = words[i]
    if w == "left" and i > 0 and words[i - 1] == "the":
        return None
    if w in ("showed", "shows") and "up" not in words[i + 1: i + 3]:
        return None
    if w == "went" and "away" not in words[i + 1: i + 3] and "out" not in words[i + 1: i + 3]:
        return None
    for kind, forms in KIND_WORDS.items():
        if w in forms:
            return kind
    if w in CHANGE_WORDS and any(v in COLOURS or v == "colour" for v in words[i + 1:]):
        return "recolour"
    return None


def _count(words: list[str]) -> tuple[int | None, bool]:
    """A number of things and whether they are "objects" (a count answer) rather than shapes: a number word or
    digit before a generic noun or a shape, colour words allowed between ("two objects", "3 green stars",
    "one object", "no objects")."""
    for i, w in enumerate(words):
        j = i + 1
        while j < len(words) and words[j] in COLOURS:
            j += 1
        if j == len(words) or not (words[j] in GENERIC_NOUNS or (words[j] in SHAPES and w != "one")):
            continue
        if w == "no":  # "no objects" is a count, "no red star appeared" a negation
            n = 0 if words[j] in GENERIC_NOUNS else None
        else:
            n = NUMBERS.get(w, int(w) if w.isdigit() else None)
        if n is not None:
            return n, words[j] in GENERIC_NOUNS
    return None, False


def _claim(words: list[str]) -> Claim:
    kinds, verb_at = set(), None
    for i in range(len(words)):
        kind = _kind_at(words, i)
        if kind is not None:
            kinds.add(kind)
            verb_at = i if verb_at is None and kind == "recolour" else verb_at
    count, of_objects = _count(words)
    if of_objects and not kinds:  # "There are two objects.": the answer to "how many?"
        kinds.add(COUNT_KIND)
    colour_words = words
    if verb_at is not None:  # "The red star turned blue": the claim is about the new colour; "from red" is the old
        colour_words = [w for j, w in enumerate(words) if j > verb_at and words[j - 1] != "from"]
    negated = any(w in NEGATIONS for w in words if not (w == "no" and count == 0 and of_objects))
    return Claim(
        kinds=frozenset(kinds),
        colours=frozenset(w for w in colour_words if w in COLOURS),
        shapes=frozenset(w for w in words if w in SHAPES),
        count=count,
        negated=negated,
    )


def _pieces(sentence: str) -> list[list[str]]:
    """A sentence cut at commas and conjunctions where each side reports an event of its own: "A red star and a
    blue circle appeared." stays one claim, "The star left and a circle appeared." becomes two."""
    out: list[list[str]] = []
    pending: list[str] = []
    for part in _JOINT.split(sentence):
        words = _words(part)
        pending += words
        if any(_kind_at(words, i) for i in range(len(words))) or _count(words)[0] is not None:
            out.append(pending)
            pending = []
    if pending:
        if out:
            out[-1] += pending
        else:
            out.append(pending)
    return out


def claims(text: str) -> list[Claim]:
    """The claims of ``text`` that state at least one fact (sentences such as "I must reply." state none)."""
    out = []
    for sentence in _SENTENCE.split(text):
        for words in _pieces(sentence):
            claim = _claim(words)
            if claim.facts():
                out.append(claim)
    return out


def contradiction(claim: Claim, gold: Claim) -> str | None:
    """What ``claim`` gets wrong about ``gold`` (the union of the gold answer's claims), or None.

    A fact the gold does not state cannot be checked and is no contradiction (a colour in a count answer); a
    description (no kind) is no contradiction of the gold's event kind, only a missing fact.
    """
    if claim.negated != gold.negated:
        return "negated" if claim.negated else "not negated"
    for name, said, right in (("kind", claim.kinds, gold.kinds), ("colour", claim.colours, gold.colours),
                              ("shape", claim.shapes, gold.shapes)):  # fmt: skip
        if right and said - right:
            return f"{name} {'/'.join(sorted(said - right))}, not {'/'.join(sorted(right))}"
    if gold.count is not None and claim.count is not None and claim.count != gold.count:
        return f"count {claim.count}, not {gold.count}"
    return None


def merge(claims_: list[Claim]) -> Claim:
    """One claim holding every fact of ``claims_`` (a gold answer that reports two things)."""
    counts = {c.count for c in claims_ if c.count is not None}
    return Claim(
        kinds=frozenset().union(*(c.kinds for c in claims_)),
        colours=frozenset().union(*(c.colours for c in claims_)),
        shapes=frozenset().union(*(c.shapes for c in claims_)),
        count=counts.pop() if len(counts) == 1 else None,
        negated=any(c.negated for c in claims_),
    )


def implied_by(claim: Claim, earlier: Claim) -> bool:
    """Whether ``earlier`` already says everything ``claim`` says (a repeat adds no information)."""
    return (
        claim.negated == earlier.negated
        and claim.kinds <= earlier.kinds
        and claim.colours <= earlier.colours
        and claim.shapes <= earlier.shapes
        and (claim.count is None or claim.count == earlier.count)
    )
