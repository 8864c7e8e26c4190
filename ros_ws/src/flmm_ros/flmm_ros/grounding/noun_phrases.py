"""Noun phrases of a free answer, with character spans: what grounded conversation grounds.

F-LMM's grounded-conversation demo takes spaCy's noun chunks of the answer; no parser model can be downloaded
here, so these are rules of our own over word lists (deterministic, no POS tagger). `noun_phrases(text)`:

1. Words are letters/digits with inner apostrophes or hyphens ("mug's", "t-shirt"); every other character is
   a boundary. Matching is case-insensitive; spans index the original text, so `text[start:end]` is the phrase
   exactly as the answer wrote it.
2. A phrase starts at a determiner, quantifier, possessive or number (`STARTERS`: "a", "the", "this", "two",
   "3", "my", ...) and takes the words after it up to the first boundary: punctuation other than a comma, a
   stop word (`STOP_WORDS`: prepositions, conjunctions, auxiliary and common verbs, relative words), an
   adverb in "-ly", another starter, or `MAX_WORDS` words. "and" / "or" / "," end it only when a starter or a
   stop word follows, so "the black and white cup" stays one phrase while "the mug and the bowl" gives two.
   "can" (`NOUN_OR_MODAL`) is a noun before punctuation, a preposition, a conjunction, an auxiliary or the end
   ("a yellow can on the left"), a modal verb otherwise ("the robot can pick it up").
3. A phrase needs a content word after its starters ("the one" and "this" alone are not phrases; "one" after a
   content word ends the phrase as its head: "the red one"), and is dropped when its last word names a place
   or the picture itself (`NOT_OBJECTS`: "the left", "the middle", "the image") or when it follows a negation
   ("there is no red mug", "not a ball": an absent thing has no mask). "no" and "none" start nothing.
4. The same phrase twice (case-insensitive) keeps its first occurrence: one object per distinct phrase.

Known limits: a phrase without a starter ("red mugs are ...", "mugs and bowls") is not found; "of" ends a
phrase ("a cup of tea" gives "a cup"); a verb not in the list ("a mug holding pens") joins the phrase until
`MAX_WORDS`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

STARTERS = frozenset(
    "a an the this these those my your our his her their its some any each every another both all several "
    "many few one two three four five six seven eight nine ten".split())
NEGATIONS = frozenset("no not none without nothing never neither nor".split())
PREPOSITIONS = frozenset(
    "in into inside within on onto upon over above under underneath below beneath behind beside besides near next "
    "to toward towards at across around between against by from off of for with without about along through "
    "after before during than like as up down out via among amid".split())
CONJUNCTIONS = frozenset("and or but nor so yet then because while if which who whom whose where when that what "
                         "how why".split())
AUXILIARIES = frozenset("is are was were be been being am has have had do does did could will would shall should "
                        "may might must".split())
VERBS = frozenset(
    "sits sit sitting sat stands stand standing stood lies lie lying lay rests rest resting placed located "
    "positioned looks look looking appears appear appearing seems seem contains contain containing holds hold "
    "holding see seen shows show showing".split())
STOP_WORDS = PREPOSITIONS | CONJUNCTIONS | AUXILIARIES | VERBS | frozenset("there here it they them".split())
# A noun or a modal verb: a noun ("a yellow can on the left") when the text ends or punctuation, a preposition, a
# conjunction or an auxiliary follows it, a modal verb ("the robot can pick it up") otherwise.
NOUN_OR_MODAL = frozenset({"can"})
NOT_OBJECTS = frozenset(
    "left right middle centre center front back top bottom side sides corner edge part area rest image picture "
    "photo photograph scene view background foreground frame camera".split())
MAX_WORDS = 6           # a starter and five words at most ("the small dark blue coffee mug")
_WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*|[^\w\s]")
_COORDINATORS = frozenset({"and", "or", ","})
_ENDS = frozenset(".;:!?()[]{}\"")


@dataclass(frozen=True)
class NounPhrase:
    """One noun phrase of a text: `text == source[start:end]`."""
    text: str
    start: int
    end: int


def _is_starter(word: str) -> bool:
    return word in STARTERS or word.isdigit()


def _is_stop(word: str, following: str | None = None) -> bool:
    """Whether `word` (followed by `following`, None at the end) ends a noun phrase."""
    if word in NOUN_OR_MODAL:
        return following is not None and following not in PREPOSITIONS | CONJUNCTIONS | AUXILIARIES | _ENDS \
            and following != ","
    return word in STOP_WORDS or word in _ENDS or (len(word) > 4 and word.endswith("ly"))


def noun_phrases(text: str) -> list[NounPhrase]:
    """The noun phrases of `text` that may name something visible, in order (rules in the module docstring)."""
    tokens = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(text)]
    words = [t[0] for t in tokens]
    found: list[NounPhrase] = []
    seen: set[str] = set()
    i = 0
    while i < len(tokens):
        if not _is_starter(words[i]) or (i > 0 and words[i - 1] in NEGATIONS):
            i += 1
            continue
        j = i + 1
        while j < len(tokens) and _is_starter(words[j]):      # "all the", "the two"
            j += 1
        end = j
        while end < len(tokens) and end - i < MAX_WORDS:
            word = words[end]
            if word in _COORDINATORS:
                after = end + 1
                while after < len(tokens) and words[after] in _COORDINATORS:
                    after += 1
                if after >= len(tokens) or _is_starter(words[after]) or words[after] in STOP_WORDS | _ENDS:
                    break
                end = after                                      # "black and white": one phrase
                continue
            if word in ("one", "ones") and end > j:          # "the red one": a pronoun head, not a number
                end += 1
                break
            following = words[end + 1] if end + 1 < len(tokens) else None
            if _is_stop(word, following) or _is_starter(word) or word in NEGATIONS:
                break
            end += 1
        content = [w for w in words[j:end] if w not in _COORDINATORS]
        if content and content[-1] not in NOT_OBJECTS:
            start, stop = tokens[i][1], tokens[end - 1][2]
            phrase = NounPhrase(text[start:stop], start, stop)
            key = " ".join(w for w in words[i:end] if w != ",")
            if key not in seen:
                seen.add(key)
                found.append(phrase)
        i = max(end, i + 1)
    return found
