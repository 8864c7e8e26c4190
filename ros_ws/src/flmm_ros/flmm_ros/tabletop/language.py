"""Words about a tabletop scene: referring expressions, answer sentences, descriptions and questions.

Everything here works on `ObjectFacts` (kind, colour, where, how big), not on pixels, and only
produces an expression when it picks out exactly one object in the scene:

- kind:            "the mug"                     (the only mug)
- colour + kind:   "the red mug"                 (the only red mug)
- colour:          "the red object"              (the only red object)
- position:        "the mug on the left", "the left mug", "the middle mug", "the front mug",
                   "the mug at the back", "the left red mug" (extreme among the objects of the
                   same kind, or same colour + kind, by a clear margin)
- size:            "the big box", "the small box" (area at least 1.5x the next one of its kind)
- relation:        "the ball next to the bowl"   (the only ball close to a uniquely named object)

Positions left / middle / right are thirds of the image width (x of the object's centre).

Two more kinds of expression test answers a robot can trust (issue #18):
- absent (`absent_expressions`): names no object of the scene: a colour + kind pair that is not there
  ("the green mug" beside a red mug and a green ball), a kind or a colour that is not there ("the bottle",
  "the orange object"), or a relation no object satisfies ("the ball next to the bowl", every ball far from it);
- groups (`group_expressions`): plural or quantified, naming every object of a kind, colour or both when
  there are two or more ("the mugs", "all the mugs", "both mugs", "every mug", "all the red objects").
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

from .shapes import KINDS

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white")
PLURALS = {"mug": "mugs", "bowl": "bowls", "ball": "balls", "box": "boxes", "bottle": "bottles", "can": "cans"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
POSITIONS = ("left", "middle", "right")
LOCATION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
INSTRUCTION_VERBS = ("pick up", "grab", "give me", "find", "point at", "take", "show me", "get")
DESCRIBE_PROMPT = "Please give me a description of the image."

# Margins that keep expressions unambiguous (all in units of the image width / height / min side).
POSITION_MARGIN = 0.05      # "where is X?" is only asked when X is this far from a third boundary
ORDER_GAP_X = 0.10          # left / right / middle among same-kind objects: centre gap, fraction of W
ORDER_GAP_Y = 0.06          # front / back: gap between base lines, fraction of H
SIZE_RATIO = 1.5            # big / small: area ratio to the next object of the same kind
NEAR_DISTANCE = 0.30        # "next to": centre distance, fraction of min(H, W)
FAR_DISTANCE = 0.45         # an absent "next to": every object of the kind at least this far from the anchor


@dataclass(frozen=True)
class ObjectFacts:
    kind: str
    colour: str
    cx: float       # centre x of the full silhouette, fraction of the image width
    base_y: float   # where the object stands, fraction of the image height (larger = nearer)
    x: float        # centre x, fraction of min(H, W) (for distances)
    y: float        # centre y, fraction of min(H, W)
    area: float     # full silhouette area, fraction of H*W


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    type: str               # colour | position | count | presence | kind | instruction | describe
    target: int | None = None  # index of the object the question is about, if any


@dataclass(frozen=True)
class AbsentExpression:
    """An expression that names no object of its scene, and why."""
    expression: str
    reason: str             # one of ABSENT_REASONS


@dataclass(frozen=True)
class GroupExpression:
    """A plural or quantified expression and every object it names (two or more)."""
    expression: str
    targets: tuple[int, ...]


ABSENT_REASONS = ("colour and kind", "kind", "colour", "relation", "plural")


def position_word(cx: float) -> str:
    return POSITIONS[min(2, int(cx * 3))]


def _clear_of_boundaries(cx: float) -> bool:
    return min(abs(cx - 1 / 3), abs(cx - 2 / 3)) > POSITION_MARGIN


def _order_expressions(objs: list[ObjectFacts], idx: list[int], noun: str) -> dict[int, list[str]]:
    """left/right/middle and front/back names among the objects `idx`, all called `noun`."""
    out: dict[int, list[str]] = {i: [] for i in idx}
    if len(idx) < 2:
        return out
    by_x = sorted(idx, key=lambda i: objs[i].cx)
    gaps = [objs[b].cx - objs[a].cx for a, b in zip(by_x, by_x[1:])]
    if gaps[0] >= ORDER_GAP_X:
        out[by_x[0]] += [f"the {noun} on the left", f"the left {noun}"]
    if gaps[-1] >= ORDER_GAP_X:
        out[by_x[-1]] += [f"the {noun} on the right", f"the right {noun}"]
    if len(idx) == 3 and min(gaps) >= ORDER_GAP_X:
        out[by_x[1]] += [f"the {noun} in the middle", f"the middle {noun}"]
    by_y = sorted(idx, key=lambda i: objs[i].base_y)
    if objs[by_y[-1]].base_y - objs[by_y[-2]].base_y >= ORDER_GAP_Y:
        out[by_y[-1]] += [f"the {noun} in front", f"the front {noun}"]
    if objs[by_y[1]].base_y - objs[by_y[0]].base_y >= ORDER_GAP_Y:
        out[by_y[0]] += [f"the {noun} at the back", f"the back {noun}"]
    return out


def _size_expressions(objs: list[ObjectFacts], idx: list[int], noun: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {i: [] for i in idx}
    if len(idx) < 2:
        return out
    by_area = sorted(idx, key=lambda i: objs[i].area)
    if objs[by_area[-1]].area >= SIZE_RATIO * objs[by_area[-2]].area:
        out[by_area[-1]] += [f"the big {noun}", f"the large {noun}"]
    if objs[by_area[1]].area >= SIZE_RATIO * objs[by_area[0]].area:
        out[by_area[0]] += [f"the small {noun}"]
    return out


def _distance(a: ObjectFacts, b: ObjectFacts) -> float:
    return float(np.hypot(a.x - b.x, a.y - b.y))


def referring_expressions(objs: list[ObjectFacts]) -> list[list[str]]:
    """For each object, the expressions that refer to it and to no other object (best first)."""
    n = len(objs)
    exprs: list[list[str]] = [[] for _ in range(n)]
    by_kind = {k: [i for i in range(n) if objs[i].kind == k] for k in KINDS}
    by_colour_kind = {(c, k): [i for i in by_kind[k] if objs[i].colour == c] for c, k in product(COLOURS, KINDS)}
    by_colour = {c: [i for i in range(n) if objs[i].colour == c] for c in COLOURS}

    # Names that need no other object, used as anchors of relations below.
    anchor_names: dict[int, str] = {}
    for i, o in enumerate(objs):
        if len(by_colour_kind[o.colour, o.kind]) == 1:
            exprs[i].append(f"the {o.colour} {o.kind}")
            anchor_names[i] = f"the {o.colour} {o.kind}"
        if len(by_kind[o.kind]) == 1:
            exprs[i].append(f"the {o.kind}")
            anchor_names[i] = f"the {o.kind}"
        if len(by_colour[o.colour]) == 1:
            exprs[i].append(f"the {o.colour} object")
    for k, idx in by_kind.items():
        for i, names in _size_expressions(objs, idx, k).items():
            exprs[i] += names
        for i, names in _order_expressions(objs, idx, k).items():
            exprs[i] += names
    for (c, k), idx in by_colour_kind.items():
        for i, names in _order_expressions(objs, idx, f"{c} {k}").items():
            exprs[i] += names

    # "the ball next to the bowl": the only ball near that bowl, every other ball clearly farther.
    for k, idx in by_kind.items():
        for anchor, anchor_name in anchor_names.items():
            if objs[anchor].kind == k or not idx:
                continue
            dist = sorted((_distance(objs[i], objs[anchor]), i) for i in idx)
            d0, i0 = dist[0]
            if d0 > NEAR_DISTANCE:
                continue
            if len(dist) > 1 and dist[1][0] < max(2 * d0, d0 + 0.15):
                continue
            exprs[i0].append(f"the {k} next to {anchor_name}")
    return exprs


def _anchor_names(objs: list[ObjectFacts]) -> dict[int, str]:
    """Objects nameable without another object ("the red mug", "the mug"), as relations use them."""
    names = {}
    for i, o in enumerate(objs):
        if sum(p.kind == o.kind and p.colour == o.colour for p in objs) == 1:
            names[i] = f"the {o.colour} {o.kind}"
        if sum(p.kind == o.kind for p in objs) == 1:
            names[i] = f"the {o.kind}"
    return names


def absent_expressions(objs: list[ObjectFacts], rng: np.random.Generator) -> list[AbsentExpression]:
    """Expressions that name nothing in the scene: up to two absent colour + kind pairs (hard ones first: the
    kind or the colour is there), an absent kind, an absent colour, a relation no object satisfies, and the plural
    of an absent kind ("all the bottles")."""
    present = {(o.colour, o.kind) for o in objs}
    kinds, colours = {o.kind for o in objs}, {o.colour for o in objs}
    out = []
    pairs = [p for p in product(COLOURS, KINDS) if p not in present]
    hard = [p for p in pairs if p[0] in colours or p[1] in kinds]
    for c, k in _shuffled(hard or pairs, rng)[:2]:
        out.append(AbsentExpression(f"the {c} {k}", "colour and kind"))
    for k in _shuffled([k for k in KINDS if k not in kinds], rng)[:1]:
        out.append(AbsentExpression(f"the {k}", "kind"))
    for c in _shuffled([c for c in COLOURS if c not in colours], rng)[:1]:
        out.append(AbsentExpression(f"the {c} object", "colour"))
    relations = []
    for anchor, name in _anchor_names(objs).items():
        for k in sorted(kinds - {objs[anchor].kind}):
            if min(_distance(o, objs[anchor]) for o in objs if o.kind == k) >= FAR_DISTANCE:
                relations.append(f"the {k} next to {name}")
    for expression in _shuffled(relations, rng)[:1]:
        out.append(AbsentExpression(expression, "relation"))
    for k in _shuffled([k for k in KINDS if k not in kinds], rng)[:1]:
        out.append(AbsentExpression(f"{('the', 'all the')[int(rng.integers(2))]} {PLURALS[k]}", "plural"))
    return out


def _shuffled(items: list, rng: np.random.Generator) -> list:
    return [items[i] for i in rng.permutation(len(items))]


def group_expressions(objs: list[ObjectFacts]) -> list[GroupExpression]:
    """Every plural or quantified expression of the scene: per kind, colour, or colour + kind with two or more
    objects ("the mugs", "all the mugs", "both mugs" for exactly two, "every mug"; "all the red objects", "every
    red object"; "the red mugs"); each names all of them."""
    out = []
    for k in KINDS:
        idx = tuple(i for i, o in enumerate(objs) if o.kind == k)
        if len(idx) >= 2:
            names = [f"the {PLURALS[k]}", f"all the {PLURALS[k]}", f"every {k}"]
            names += [f"both {PLURALS[k]}"] if len(idx) == 2 else []
            out += [GroupExpression(n, idx) for n in names]
    for c in COLOURS:
        idx = tuple(i for i, o in enumerate(objs) if o.colour == c)
        if len(idx) >= 2:
            out += [GroupExpression(f"all the {c} objects", idx), GroupExpression(f"every {c} object", idx)]
        for k in KINDS:
            same = tuple(i for i in idx if objs[i].kind == k)
            if len(same) >= 2:
                out.append(GroupExpression(f"the {c} {PLURALS[k]}", same))
    return out


def is_positional(expression: str) -> bool:
    words = expression.split()
    return any(w in words for w in ("left", "right", "middle", "front", "back"))


def answer_sentence(obj: ObjectFacts, expressions: list[str]) -> str:
    """What the robot says about the object, e.g. "the red mug is on the left."."""
    location = LOCATION_PHRASES[position_word(obj.cx)]
    plain = [e for e in expressions if not is_positional(e) and not e.endswith(" object")]
    if plain:
        return f"{plain[0]} is {location}."
    if expressions:
        return f"{expressions[0]} is {obj.colour}."
    return f"there is {indefinite(obj.colour, obj.kind)} {location}."


def indefinite(colour: str, kind: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {kind}"


def describe(objs: list[ObjectFacts]) -> str:
    """The objects left to right: "a red mug on the left, a blue bowl in the middle and a ball ..."."""
    parts = [f"{indefinite(o.colour, o.kind)} {LOCATION_PHRASES[position_word(o.cx)]}"
             for o in sorted(objs, key=lambda o: o.cx)]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


def questions(objs: list[ObjectFacts], exprs: list[list[str]], answers: list[str],
              rng: np.random.Generator) -> list[QAPair]:
    """Every question the scene answers unambiguously (absent colour/kind pairs are sampled)."""
    qa: list[QAPair] = [QAPair(DESCRIBE_PROMPT, describe(objs), "describe")]
    for i, o in enumerate(objs):
        for e in exprs[i]:
            if o.colour not in e.split():
                qa.append(QAPair(f"what colour is {e}?", o.colour, "colour", i))
            if not is_positional(e) and _clear_of_boundaries(o.cx):
                qa.append(QAPair(f"where is {e}?", position_word(o.cx), "position", i))
            if e == f"the {o.colour} object":
                qa.append(QAPair(f"what is {e}?", o.kind, "kind", i))
            verb = INSTRUCTION_VERBS[rng.integers(len(INSTRUCTION_VERBS))]
            qa.append(QAPair(f"{verb} {e}", answers[i], "instruction", i))

    counts = {k: sum(o.kind == k for o in objs) for k in KINDS}
    for k, c in counts.items():
        qa.append(QAPair(f"how many {PLURALS[k]} are there?", NUMBER_WORDS[c], "count"))
        qa.append(QAPair(f"is there a {k}?", "yes" if c else "no", "presence"))
    qa.append(QAPair("how many objects are there?", NUMBER_WORDS[len(objs)], "count"))

    present = sorted({(o.colour, o.kind) for o in objs})
    for c, k in present:
        qa.append(QAPair(f"is there {indefinite(c, k)}?", "yes", "presence"))
    # Absent pairs, hard ones first: a present kind in another colour, a present colour on another kind.
    absent = [p for p in product(COLOURS, KINDS) if p not in present]
    hard = [p for p in absent if any(p[0] == c or p[1] == k for c, k in present)]
    easy = [p for p in absent if p not in hard]
    rng.shuffle(hard)
    rng.shuffle(easy)
    for c, k in (hard + easy)[:len(present) + 1]:
        qa.append(QAPair(f"is there {indefinite(c, k)}?", "no", "presence"))
        verb = INSTRUCTION_VERBS[rng.integers(len(INSTRUCTION_VERBS))]
        qa.append(QAPair(f"{verb} the {c} {k}", f"there is no {c} {k}.", "instruction"))
    return qa


def scene_vocabulary() -> list[str]:
    """Every word and punctuation mark the templates above can produce (lower case)."""
    words = set(COLOURS) | set(KINDS) | set(PLURALS.values()) | set(NUMBER_WORDS) | set(POSITIONS)
    for text in list(LOCATION_PHRASES.values()) + list(INSTRUCTION_VERBS) + [DESCRIBE_PROMPT.lower()]:
        words |= set(text.replace(".", " .").split())
    words |= {"the", "a", "an", "on", "in", "at", "of", "is", "are", "there", "no", "yes", "object", "objects",
              "what", "colour", "where", "how", "many", "next", "to", "and", "big", "large", "small",
              "front", "back", "it", ".", ",", "?", "all", "every", "both"}
    return sorted(words)
