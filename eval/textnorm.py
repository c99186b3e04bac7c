"""Text normalisation for the offline judge: content tokens, light stemming, and the "key" words
(colours, shapes, numbers) that carry most of the meaning of the synthetic benchmark's short answers
("A red circle appeared.", "Two squares are visible.").

Deliberately small and dependency-free: lower-case, split on anything that is not a letter or digit, number words
become digits, stop words go, then a crude suffix stemmer so "appeared"/"appears"/"appearing" and
"circle"/"circles" meet. It only has to make the same word look the same on both sides, not be linguistics.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")

# "one" is left out on purpose: it is far more often a pronoun ("the blue one") than a count.
NUMBER_WORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
}  # fmt: skip

COLOURS = frozenset(
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta violet gold silver".split()
)
SHAPES = frozenset(
    "circle square triangle rectangle star ellipse oval diamond hexagon pentagon octagon cross heart ring "
    "dot disc disk cube box ball line arrow".split()
)

STOP_WORDS = frozenset(
    """a an the and or but if then than so of to in on at by for from with without into onto over under about
    as is are was were be been being am do does did doing done has have had having it its it's this that these
    those there here their they them he she his her him we us our you your i me my mine what which who whom whose
    when where why how all any some each every no not nor only own same too very can will just should could would
    may might must shall also now still yet again more most other such up down out off while until s t
    video clip frame scene image screen shown show shows showing see seen visible""".split()
)  # "video", "shown", "visible"... are in every answer about a video and say nothing about it


def _stem(word: str) -> str:
    if word.isdigit():
        return word
    # plural first, then -ing/-ed, then a final -e, each only while a stem of >= 3 letters remains
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("ches", "shes", "sses", "xes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word


def _canonical(word: str) -> str:
    word = NUMBER_WORDS.get(word, word)
    return "gray" if word == "grey" else word


KEY_CATEGORY: dict[str, str] = {}
for _w in COLOURS:
    KEY_CATEGORY[_stem(_canonical(_w))] = "colour"
for _w in SHAPES:
    KEY_CATEGORY[_stem(_canonical(_w))] = "shape"


def normalise(text: str) -> str:
    """Lower-case words joined by single spaces, punctuation dropped: the form compared for exact repeats."""
    return " ".join(_TOKEN.findall(text.lower()))


def content_tokens(text: str) -> set[str]:
    """The set of stemmed content words (stop words removed, number words as digits)."""
    out = set()
    for raw in _TOKEN.findall(text.lower()):
        word = _canonical(raw)
        if word in STOP_WORDS:
            continue
        out.add(_stem(word))
    return out


def key_category(token: str) -> str | None:
    """'colour', 'shape' or 'number' for a key token from :func:`content_tokens`, else None."""
    if token.isdigit():
        return "number"
    return KEY_CATEGORY.get(token)
