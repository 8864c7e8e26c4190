"""Which phrases to ground: from a robot instruction, or from the LMM's answer (reasoning mode).

Instruction mode, `phrases_from_instruction` (word lists below; deterministic, no parser):
1. Text is NFKC-normalised, lower-cased and split into words and punctuation; other symbols
   (quotes, brackets, extra spaces) are dropped. Phrases come back lower-case.
2. Clauses: the text splits at `. ; ! ?`, at "then", and at "and" / "," when a command verb follows
   ("pick the mug and put it in the sink" -> two clauses).
3. In each clause, leading fillers ("please", "can you", "robot", ...) are dropped, then the longest
   command verb at the start ("pick up", "show me", "where is", "put", ...), then an indirect object
   or particle right after it ("get me ...", "put down ..."); trailing fillers ("please", "for me",
   "up", ...) too.
4. Placement verbs (`PLACEMENT_VERBS`: put, place, move, drop, stack, ...) take an object and a
   destination. The destination starts at the LAST placement preposition (`PLACEMENT_PREPOSITIONS`:
   in, on, into, next to, to the left of, ...) whose target names something, i.e. is not made only of
   determiners, pronouns, direction words and prepositions: "put the apple in the bowl on the left"
   -> ["the apple", "the bowl on the left"]; "put the ball next to the bowl in the box" ->
   ["the ball next to the bowl", "the box"]. Trailing direction adverbs (`DIRECTION_ADVERBS`: "left",
   "back", "a bit", ...) are dropped unless they end a relation ("on the left"); without a naming
   target and without such an adverb, the last destination is only a direction and is dropped:
   "put the cup on the left" -> ["the cup"], "move the cup on the left to the right" ->
   ["the cup on the left"], "push the box on the right forward" -> ["the box on the right"].
5. With any command verb, a source preposition ("from", "out of", "off") also starts a new object:
   "take the apple out of the bowl" -> ["the apple", "the bowl"].
6. Other relations stay inside their noun phrase, because they identify one object:
   "pick the ball next to the bowl" -> ["the ball next to the bowl"].
7. Coordination ("and", "or", ",", "&", "plus", "as well as") splits objects only when a
   determiner or number follows: "the mug and the ball" -> two phrases, but "the black and white
   cup" and "the mug and ball" stay one. Commas inside a phrase are dropped.
8. Phrases made only of pronouns/determiners ("it", "them", "that") are dropped; repeats are dropped.
   No phrase left -> GroundingError("no object to ground in ...").

Reasoning mode (F-LMM `rebuttal` branch, `scripts/reason_seg.py` + `FrozenLlavaSAM.reason_seg`): the LMM
first answers the question and the answer's tokens are grounded, all merged into one mask.
- `reasoning_prompt(q, is_sentence)`: a short query (ReasonSeg's `is_sentence` false) becomes
  "What is {q} in this image? "; then `REASONING_SUFFIX` is appended directly, so a sentence query gets it
  without a space ("...cut the bread?Briefly answer ..."), exactly as F-LMM builds it. The node has no
  query type: `is_sentence=None` guesses it with `is_sentence_query` (a question mark or a question word first).
- The prompt string ends with `REASONING_ANSWER_PREFIX` ("It is", no space after the template, so the
  tokenizer gives `It`, not `▁It`); at most `REASONING_MAX_NEW_TOKENS` (16) tokens are then generated after
  the first one, greedily.
- The grounded rows are the tokens fed back while generating: every generated token but the last (a
  generated '.' included, "It is" not), collected during generation (`LMMAdapter.reasoning_pass`), never a
  re-tokenised copy of the decoded answer. `reasoning_phrase` only names that mask for display.
"""
from __future__ import annotations

import re
import unicodedata

from .types import GroundingError

REASONING_ANSWER_PREFIX = "It is"
REASONING_SUFFIX = "Briefly answer the question in a single sentence."
REASONING_MAX_NEW_TOKENS = 16   # scripts/reason_seg.py: max_new_tokens=16


def _phrases(*items: str) -> tuple[tuple[str, ...], ...]:
    """Word tuples, longest first, so matching always takes the longest phrase."""
    return tuple(sorted((tuple(s.split()) for s in items), key=len, reverse=True))


LEADING_FILLERS = _phrases(
    "please", "kindly", "hey", "hi", "hello", "ok", "okay", "robot", "now", "and", "also", "so", "then",
    "first", "next", "finally", "just", ",", "can you", "could you", "would you", "will you",
    "i want you to", "i need you to", "i'd like you to", "i would like you to", "you should",
    "try to", "go and", "go", "help me", "let's", "quickly", "carefully", "gently", "slowly")
TRAILING_FILLERS = _phrases(
    "please", "for me", "thanks", "thank you", "now", "right now", "quickly", "carefully", "gently",
    "slowly", "up", "is", "are", "located", "is located", ",", "are there", "is there", "do you see",
    "can you see", "in the image", "in the picture", "in the scene", "in view")
SELECT_VERBS = _phrases(
    "pick up", "pick out", "pick", "grab", "grasp", "take", "take out", "get", "get me", "fetch",
    "find", "locate", "show", "show me", "show me where", "tell me where", "point at", "point to",
    "point out", "segment", "highlight", "select", "detect", "identify", "mark", "look at",
    "look for", "search for", "see", "bring me", "hand me", "give me", "pass me", "lift", "hold",
    "touch", "open", "close", "reach for", "go to", "track", "focus on", "clean", "wipe",
    "where is", "where are", "where's", "which is", "what is", "what's", "is there", "are there",
    "do you see", "can you see", "how many", "count", "what colour is", "what color is", "what colour are",
    "what color are", "what is the colour of", "what is the color of", "what kind of object is")
PLACEMENT_VERBS = _phrases(
    "put", "put down", "put back", "put away", "place", "move", "drop", "stack", "set", "set down",
    "push", "pull", "slide", "throw", "toss", "pour", "lay", "hang", "insert", "transfer", "carry",
    "bring", "give", "hand", "pass", "return", "shift", "drag", "store")
PLACEMENT_PREPOSITIONS = _phrases(
    "in", "into", "inside", "inside of", "within", "on", "onto", "on top of", "over", "above", "under",
    "underneath", "below", "beneath", "behind", "in front of", "next to", "beside", "near", "near to",
    "close to", "closer to", "by", "between", "against", "to", "toward", "towards", "at", "across",
    "around", "left of", "right of", "to the left of", "to the right of", "on the left of",
    "on the right of")
SOURCE_PREPOSITIONS = _phrases("from", "out of", "off", "off of", "away from")
COORDINATORS = _phrases("and", "or", ",", "&", "plus", "as well as")
AFTER_VERB = {"me", "us", "up", "down", "out", "back", "away"}
DETERMINERS = {"the", "a", "an", "this", "that", "these", "those", "my", "your", "our", "his", "her",
               "their", "its", "some", "any", "all", "both", "each", "every", "another", "other",
               "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}
PRONOUNS = {"it", "them", "they", "me", "us", "you", "him", "her", "something", "anything",
            "everything", "one", "ones", "here", "there"}
DIRECTION_WORDS = {"left", "right", "top", "bottom", "middle", "center", "centre", "front", "back",
                   "side", "sides", "corner", "edge", "up", "down", "away", "forward", "forwards",
                   "backward", "backwards", "aside", "closer", "further", "farther", "over", "here",
                   "there", "bit", "little", "slightly", "more", "far", "near", "hand"}
DIRECTION_ADVERBS = _phrases(
    "left", "right", "up", "down", "away", "forward", "forwards", "backward", "backwards", "back",
    "aside", "closer", "further", "farther", "over", "here", "there", "a bit", "a little",
    "a little bit", "a bit more", "slightly", "more")
QUESTION_WORDS = {"what", "what's", "which", "where", "where's", "who", "whom", "whose", "why", "how",
                  "when", "is", "are", "was", "were", "can", "could", "do", "does", "did", "should",
                  "would", "will", "shall", "may", "might", "has", "have"}
_PREPOSITION_WORDS = ({w for p in PLACEMENT_PREPOSITIONS + SOURCE_PREPOSITIONS for w in p}
                      - DIRECTION_WORDS - DETERMINERS)
_NOT_A_NAME = DETERMINERS | PRONOUNS | DIRECTION_WORDS | _PREPOSITION_WORDS
_CLAUSE_ENDS = {".", ";", "!", "?"}
_TOKEN = re.compile(r"[^\W_]+(?:['-][^\W_]+)*|[,;.!?&]")

Tokens = list[str]


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return re.sub(r"[\u2018\u2019\u02bc`]", "'", text)


def _tokens(text: str) -> Tokens:
    return _TOKEN.findall(_normalise(text).lower())


def _match(tokens: Tokens, start: int, table) -> int:
    """Length of the longest phrase of `table` at tokens[start:], 0 if none."""
    for phrase in table:
        if tuple(tokens[start:start + len(phrase)]) == phrase:
            return len(phrase)
    return 0


def _find_all(tokens: Tokens, table) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) spans of `table` phrases, scanning left to right, longest first."""
    spans, i = [], 0
    while i < len(tokens):
        n = _match(tokens, i, table)
        if n:
            spans.append((i, i + n))
            i += n
        else:
            i += 1
    return spans


def _strip_leading(tokens: Tokens, table) -> Tokens:
    while tokens and (n := _match(tokens, 0, table)):
        tokens = tokens[n:]
    return tokens


def _strip_trailing(tokens: Tokens, table) -> Tokens:
    while tokens:
        phrase = next((p for p in table if len(p) <= len(tokens) and tuple(tokens[-len(p):]) == p), None)
        if phrase is None:
            return tokens
        tokens = tokens[:-len(phrase)]
    return tokens


def _names_something(tokens: Tokens) -> bool:
    return any(t not in _NOT_A_NAME and t != "," for t in tokens)


def _command(tokens: Tokens) -> tuple[str | None, Tokens]:
    """Drop leading fillers and the command verb: ('place' | 'select' | None, rest)."""
    while tokens:
        place, select = _match(tokens, 0, PLACEMENT_VERBS), _match(tokens, 0, SELECT_VERBS)
        if place or select:
            kind, n = ("place", place) if place > select else ("select", select)
            rest = tokens[n:]
            while len(rest) > 1 and rest[0] in AFTER_VERB:
                rest = rest[1:]
            return kind, rest
        n = _match(tokens, 0, LEADING_FILLERS)
        if not n:
            break
        tokens = tokens[n:]
    return None, tokens


def _starts_command(tokens: Tokens) -> bool:
    tokens = _strip_leading(tokens, (("please",), ("also",), ("then",), ("now",)))
    return bool(_match(tokens, 0, PLACEMENT_VERBS) or _match(tokens, 0, SELECT_VERBS))


def _clauses(tokens: Tokens) -> list[Tokens]:
    clauses, current = [], []
    for i, token in enumerate(tokens):
        if token in _CLAUSE_ENDS or token == "then" or (token in {"and", ","} and _starts_command(tokens[i + 1:])):
            clauses.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in clauses + [current] if c]


def _strip_adverbs(tokens: Tokens) -> Tokens:
    """Drop trailing direction adverbs ("left", "a bit"), but not a relation's end ("on the left")."""
    while (n := next((len(p) for p in DIRECTION_ADVERBS
                      if len(p) < len(tokens) and tuple(tokens[-len(p):]) == p), 0)):
        if tokens[-n - 1] in DETERMINERS | _PREPOSITION_WORDS:
            break
        tokens = tokens[:-n]
    return tokens


def _split_destination(tokens: Tokens) -> list[Tokens]:
    """[object, destination] at the last placement preposition whose target names something."""
    without_adverbs = _strip_adverbs(tokens)
    had_adverb, tokens = without_adverbs != tokens, without_adverbs
    spans = [(s, e) for s, e in _find_all(tokens, PLACEMENT_PREPOSITIONS) if s > 0]
    for start, end in reversed(spans):
        if _names_something(tokens[end:]):
            return [_strip_adverbs(tokens[:start]), tokens[end:]]
    if spans and not had_adverb:  # the destination is only a direction ("on the left", "to me"): drop it
        tokens = _strip_adverbs(tokens[:spans[-1][0]])
    return [tokens]


def _split_source(tokens: Tokens) -> list[Tokens]:
    for start, end in _find_all(tokens, SOURCE_PREPOSITIONS):
        if _names_something(tokens[end:]):
            return [tokens[:start], tokens[end:]]
    return [tokens]


def _split_coordination(tokens: Tokens) -> list[Tokens]:
    parts, current, i = [], [], 0
    while i < len(tokens):
        n = _match(tokens, i, COORDINATORS)
        if n:
            j = i + n
            while j < len(tokens) and (m := _match(tokens, j, COORDINATORS)):
                j += m
            if j < len(tokens) and (tokens[j] in DETERMINERS or tokens[j].isdigit()):
                parts.append(current)
                current, i = [], j
                continue
        current.append(tokens[i])
        i += 1
    return parts + [current]


def _clause_phrases(clause: Tokens) -> list[str]:
    kind, tokens = _command(clause)
    tokens = _strip_trailing(tokens, TRAILING_FILLERS)
    parts = _split_destination(tokens) if kind == "place" else [tokens]
    if kind is not None:
        parts = [piece for part in parts for piece in _split_source(part)]
    phrases = []
    for part in parts:
        for words in _split_coordination(part):
            words = [w for w in words if w != ","]
            words = _strip_trailing(_strip_leading(words, COORDINATORS), COORDINATORS)
            if words and not all(w in DETERMINERS | PRONOUNS for w in words):
                phrases.append(" ".join(words))
    return phrases


def phrases_from_instruction(instruction: str) -> list[str]:
    """The objects an instruction refers to, in order (rules in the module docstring)."""
    phrases: list[str] = []
    for clause in _clauses(_tokens(instruction)):
        phrases += [p for p in _clause_phrases(clause) if p not in phrases]
    if not phrases:
        raise GroundingError(f"no object to ground in {instruction!r}")
    return phrases


def is_sentence_query(query: str) -> bool:
    """A question (ends with '?' or starts with a question word) rather than a short noun phrase."""
    words = _tokens(query)
    return query.rstrip().endswith("?") or (bool(words) and words[0] in QUESTION_WORDS)


def reasoning_prompt(query: str, is_sentence: bool | None = None) -> str:
    """F-LMM's reasoning-segmentation instruction; generate the answer after REASONING_ANSWER_PREFIX.

    `is_sentence` is the query type (ReasonSeg's `is_sentence`); None guesses it from the text."""
    if not query.strip():
        raise GroundingError("empty question")
    if is_sentence is None:
        is_sentence = is_sentence_query(query)
    if not is_sentence:
        query = f"What is {query} in this image? "
    return query + REASONING_SUFFIX


def reasoning_phrase(grounded_text: str) -> str:
    """A display name for the reasoning mask: the grounded tokens' text without final punctuation ("it" if
    nothing is left, since the mask is what "It is" refers to)."""
    text = " ".join(_normalise(grounded_text).split()).rstrip(" .!?,;:").strip()
    return text if re.search(r"[^\W_]", text) else "it"
