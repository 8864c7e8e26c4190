"""A spoken answer that agrees with the grounding (issue #18).

The frozen LMM answers on its own and can contradict the masks ("there is no red mug." while the red mug is
masked with score 0.92). With `answer_source: grounded` the presence decisions and the masks bound what the LMM
may say about the named objects (constrained decoding: the LMM's greedy answer, with the words that would
contradict the grounding taken out of its choices), or decide the key word and let the LMM go on from it:

- a yes / no question about presence ("is there ...", "are there ...", "do you see ..."): "yes" when every phrase
  is found, else "no"; the LMM continues after that word (forced prefix);
- "how many ...": the number of instances found (a number word); the LMM continues after it;
- any other instruction or question naming a phrase judged absent: "there is no <phrase>." for each of them
  (the LMM is not asked: it could name something else);
- a command whose phrases are all found: "<phrase> is on the left / in the middle / on the right." from each
  mask's centre (thirds of the image width); a plural phrase lists its instances' places;
- any other question whose phrases are all found ("what colour is the mug?", "where is the mug?"): the LMM's own
  answer, decoded without negation words ("no", "not", "none", ...) and without place words ("left", "middle",
  "right", ...) that contradict where the masks are (constrained decoding, ranked: `TrustMixin._constrained`).

`answer_claims` reads an answer back the same way, so agreement can be measured on any answer, the LMM's own
included: a yes / no answer's first word, a count's number, else whether it has a negation word.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from .instances import is_plural
from .types import GroundedObject

PRESENCE_OPENINGS = ("is there", "are there", "do you see", "can you see", "is there any", "are there any")
COUNT_OPENINGS = ("how many",)
QUESTION_WORDS = {"what", "what's", "which", "where", "where's", "who", "whose", "why", "how", "when", "is", "are",
                  "was", "were", "can", "could", "do", "does", "did", "should", "would", "will"}
NEGATIONS = {"no", "not", "none", "nothing", "zero", "don't", "doesn't", "isn't", "aren't", "cannot", "can't",
             "nowhere", "neither", "nor", "without", "absent", "missing"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLACES = ("on the left", "in the middle", "on the right")
PLACE_WORDS = {"on the left": ("left", "leftmost"), "in the middle": ("middle", "centre", "center", "central"),
               "on the right": ("right", "rightmost")}
_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def question_kind(instruction: str) -> str:
    """'presence' | 'count' | 'question' | 'command', from the instruction's opening words and '?'."""
    text = " ".join(_words(instruction))
    if text.startswith(COUNT_OPENINGS):
        return "count"
    if text.startswith(PRESENCE_OPENINGS):
        return "presence"
    words = text.split()
    if instruction.rstrip().endswith("?") or (words and words[0] in QUESTION_WORDS):
        return "question"
    return "command"


def bare(phrase: str) -> str:
    """The phrase without its leading article or quantifier: 'the red mug' -> 'red mug', 'all the mugs' -> 'mugs'."""
    return re.sub(r"^((all|both|each|every) (of )?)?((the|a|an|this|that|these|those) )?", "", phrase.strip()).strip() \
        or phrase


def place(mask: np.ndarray) -> str:
    """Where the mask's centre is, in thirds of the image width."""
    xs = np.nonzero(mask)[1]
    if xs.size == 0:
        return ""
    return PLACES[min(2, int(3 * (xs.mean() + 0.5) / mask.shape[1]))]


def _found_by_phrase(phrases: Sequence[str], objects: Sequence[GroundedObject]) -> dict[str, list[GroundedObject]]:
    by_phrase: dict[str, list[GroundedObject]] = {p: [] for p in phrases}
    for obj in objects:
        if obj.found and obj.phrase in by_phrase:
            by_phrase[obj.phrase].append(obj)
    return by_phrase


def describe(phrase: str, found: Sequence[GroundedObject]) -> str:
    """'the red mug is on the right.' / 'the mugs are on the left and in the middle.' / 'every mug is ...'"""
    places = list(dict.fromkeys(p for p in (place(o.mask) for o in sorted(found, key=_centre_x)) if p))
    singular_subject = phrase.lower().split()[:1] in (["every"], ["each"])     # "every mug is", not "are"
    verb = "are" if (len(found) > 1 or is_plural(phrase)) and not singular_subject else "is"
    return f"{phrase} {verb} {' and '.join(places) or 'here'}."


def _centre_x(obj: GroundedObject) -> float:
    xs = np.nonzero(obj.mask)[1]
    return float(xs.mean()) if xs.size else 0.0


def absent_sentence(phrase: str) -> str:
    name = bare(phrase)
    return f"there {'are' if is_plural(name) else 'is'} no {name}."


def banned_words(phrases: Sequence[str], objects: Sequence[GroundedObject]) -> list[str]:
    """Words the answer may not use when every phrase is found: negations, and place words that name a third of
    the image none of the found masks is in."""
    places = {place(o.mask) for o in objects if o.found}
    words = sorted(NEGATIONS)
    for third, spellings in PLACE_WORDS.items():
        if third not in places:
            words += spellings
    return words


def grounded_answer(instruction: str, phrases: Sequence[str], objects: Sequence[GroundedObject],
                    generate: Callable[[str, list[str]], str]) -> str:
    """The answer whose claims follow the objects (rules in the module docstring). `generate(prefix, banned)` is
    the LMM's greedy answer to the instruction after the forced `prefix`, never choosing a word of `banned`."""
    found = _found_by_phrase(phrases, objects)
    absent = [p for p in phrases if not found[p]]
    kind = question_kind(instruction)
    if kind in ("presence", "count"):
        if kind == "presence":
            word = "no" if absent else "yes"
        else:
            n = len(found[phrases[0]]) if phrases else 0
            word = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
        return f"{word} {generate(word, [])}".strip()
    if absent:
        return " ".join(absent_sentence(p) for p in absent)
    if kind == "command":
        return " ".join(describe(p, found[p]) for p in phrases)
    return generate("", banned_words(phrases, objects))


def denies(answer: str) -> bool:
    """Whether the answer says something is not there (a negation word)."""
    return any(w in NEGATIONS for w in _words(answer))


def answer_claims(instruction: str, answer: str) -> tuple[bool, int | None]:
    """What an answer claims: (every named object is there, how many there are or None)."""
    words = _words(answer)
    kind = question_kind(instruction)
    if kind == "presence" and words and words[0] in ("yes", "no"):
        return words[0] == "yes", None
    if kind == "count":
        for w in words:
            if w in NUMBER_WORDS or w.isdigit():
                n = NUMBER_WORDS.index(w) if w in NUMBER_WORDS else int(w)
                return n > 0, n
    return not denies(answer), None


def agrees(instruction: str, answer: str, phrases: Sequence[str], objects: Sequence[GroundedObject]) -> bool:
    """The answer's claims match the published objects: all found <=> the answer says they are there, and for
    "how many" the number said equals the number of instances found."""
    found = _found_by_phrase(phrases, objects)
    all_found = all(found[p] for p in phrases)
    claims_found, count = answer_claims(instruction, answer)
    if question_kind(instruction) == "count":
        return count is not None and count == (len(found[phrases[0]]) if phrases else 0)
    return claims_found == all_found
