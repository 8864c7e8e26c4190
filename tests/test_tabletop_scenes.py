"""Generated tabletop scenes: determinism, exact disjoint masks, unambiguous expressions, questions."""
import re

import numpy as np
import pytest

from flmm_ros.tabletop.language import (COLOURS, NUMBER_WORDS, ORDER_GAP_X, ORDER_GAP_Y, PLURALS, SIZE_RATIO,
                                        position_word)
from flmm_ros.tabletop.scenes import (COLOUR_RGB, MIN_VISIBLE, generate_scene, split_of_seed, split_seeds)
from flmm_ros.tabletop.shapes import KINDS

SEEDS = range(60)


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b = generate_scene(7, (240, 320)), generate_scene(7, (240, 320))
    assert np.array_equal(a.image, b.image)
    assert [o.expressions for o in a.objects] == [o.expressions for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert a.questions == b.questions and a.description == b.description
    assert not np.array_equal(a.image, generate_scene(8, (240, 320)).image)


@pytest.mark.parametrize("size", [(256, 256), (480, 640), (192, 256)])
def test_image_shape_and_object_counts(size):
    counts = set()
    for seed in range(20):
        scene = generate_scene(seed, size)
        assert scene.image.shape == (*size, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 5
        counts.add(len(scene.objects))
        for obj in scene.objects:
            assert obj.kind in KINDS and obj.colour in COLOURS
            assert obj.mask.shape == size and obj.mask.dtype == bool
    assert len(counts) >= 3


def test_variety_of_kinds_colours_and_backgrounds():
    scenes = [generate_scene(s, (128, 160)) for s in SEEDS]
    assert {o.kind for s in scenes for o in s.objects} == set(KINDS)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    corners = {tuple(s.image[-1, 0] // 16) for s in scenes}
    assert len(corners) > 10


def test_a_narrowed_palette_keeps_kinds_and_tells_objects_apart_by_kind():
    scenes = [generate_scene(s, (128, 160), colours=("red",)) for s in SEEDS]
    assert {o.colour for s in scenes for o in s.objects} == {"red"}
    assert {o.kind for s in scenes for o in s.objects} == set(KINDS)
    # One colour: an object is named by its kind (or place), never by a colour that would single it out.
    assert any("the mug" in o.expressions for s in scenes for o in s.objects if len(s.objects) > 1)
    with pytest.raises(ValueError, match="colours must be a non-empty subset"):
        generate_scene(0, colours=("teal",))
    with pytest.raises(ValueError, match="colours must be a non-empty subset"):
        generate_scene(0, colours=())


def test_masks_are_disjoint_visible_parts_with_exact_boxes():
    for seed in SEEDS:
        scene = generate_scene(seed, (240, 320))
        h, w = scene.image.shape[:2]
        cover = np.zeros((h, w), int)
        for obj in scene.objects:
            cover += obj.mask
            ys, xs = np.nonzero(obj.mask)
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            visible = obj.mask.sum() / (obj.facts.area * h * w)
            assert MIN_VISIBLE - 1e-6 <= visible <= 1 + 1e-6
        assert cover.max() <= 1, "masks overlap"
        # The front-most object is occluded by nothing: its mask is its whole silhouette, pixel for pixel.
        front = scene.objects[-1]
        assert front.mask.sum() == round(front.facts.area * h * w)


def _colour_votes(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of each pixel, compared after normalising brightness."""
    names = list(COLOUR_RGB)
    refs = np.array([np.array(COLOUR_RGB[c]) / max(COLOUR_RGB[c]) for c in names])
    norm = pixels / np.maximum(pixels.max(1, keepdims=True), 1e-6)
    return np.linalg.norm(norm[:, None, :] - refs[None], axis=2).argmin(1)


def test_mask_pixels_show_the_object_colour():
    """The masked pixels are the object's: most of them have the object's named colour."""
    names = list(COLOUR_RGB)
    wrong = []
    for seed in SEEDS:
        scene = generate_scene(seed, (240, 320))
        for obj in scene.objects:
            votes = np.bincount(_colour_votes(scene.image[obj.mask].astype(float)), minlength=len(names))
            if names[votes.argmax()] != obj.colour:
                wrong.append((seed, obj.kind, obj.colour, names[votes.argmax()]))
    assert len(wrong) <= 2, wrong


# --- an independent reader of the expressions: which objects does each one describe? ---

def _candidates(scene, noun):
    words = noun.split()
    if len(words) == 2:
        return [o for o in scene.objects if o.colour == words[0] and o.kind == words[1]]
    return [o for o in scene.objects if o.kind == noun]


def _resolve(scene, expr):
    """Objects that `expr` can denote, reading it with the plain meaning of its words."""
    nouns = "|".join([f"{c} {k}" for c in COLOURS for k in KINDS] + list(KINDS))
    if m := re.fullmatch(rf"the ({nouns})", expr):
        return _candidates(scene, m[1])
    if m := re.fullmatch(r"the (\w+) object", expr):
        return [o for o in scene.objects if o.colour == m[1]]
    if m := re.fullmatch(r"the (\w+) next to (the .+)", expr):
        anchors = _resolve(scene, m[2])
        assert len(anchors) == 1
        same = sorted(_candidates(scene, m[1]), key=lambda o: np.hypot(o.facts.x - anchors[0].facts.x,
                                                                       o.facts.y - anchors[0].facts.y))
        return same[:1] if len(same) == 1 or _dist(same[1], anchors[0]) >= 2 * _dist(same[0], anchors[0]) else same
    for pattern, key, pick in [(rf"the ({nouns}) on the left|the left ({nouns})", "cx", "min"),
                               (rf"the ({nouns}) on the right|the right ({nouns})", "cx", "max"),
                               (rf"the ({nouns}) in front|the front ({nouns})", "base_y", "max"),
                               (rf"the ({nouns}) at the back|the back ({nouns})", "base_y", "min"),
                               (rf"the (?:big|large) ({nouns})", "area", "max"),
                               (rf"the small ({nouns})", "area", "min")]:
        if m := re.fullmatch(pattern, expr):
            cands = sorted(_candidates(scene, m[1] or m[2]), key=lambda o: getattr(o.facts, key))
            first, second = (cands[0], cands[1]) if pick == "min" else (cands[-1], cands[-2])
            a, b = getattr(first.facts, key), getattr(second.facts, key)
            clear = {"cx": abs(a - b) >= ORDER_GAP_X, "base_y": abs(a - b) >= ORDER_GAP_Y,
                     "area": max(a, b) >= SIZE_RATIO * min(a, b)}[key]
            return [first] if clear else [first, second]
    if m := re.fullmatch(rf"the middle ({nouns})|the ({nouns}) in the middle", expr):
        cands = sorted(_candidates(scene, m[1] or m[2]), key=lambda o: o.facts.cx)
        assert len(cands) == 3
        gaps = np.diff([o.facts.cx for o in cands])
        return [cands[1]] if gaps.min() >= ORDER_GAP_X else cands
    raise AssertionError(f"expression with an unknown form: {expr!r}")


def _dist(a, b):
    return np.hypot(a.facts.x - b.facts.x, a.facts.y - b.facts.y)


def test_every_expression_denotes_exactly_its_own_object():
    forms = set()
    for seed in range(150):
        scene = generate_scene(seed, (240, 320))
        for obj in scene.objects:
            for expr in obj.expressions:
                assert _resolve(scene, expr) == [obj], (seed, expr)
                forms.add(re.sub(r"\b(" + "|".join(COLOURS + KINDS) + r")\b", "X", expr))
    # All kinds of expressions occur: kind, colour, position, front/back, size, relation.
    for form in ["the X", "the X X", "the X object", "the X on the left", "the left X", "the front X",
                 "the big X", "the small X", "the X next to the X", "the X at the back"]:
        assert form in forms, form


def test_ambiguous_names_are_never_generated():
    for seed in range(150):
        scene = generate_scene(seed, (240, 320))
        kinds = [o.kind for o in scene.objects]
        for obj in scene.objects:
            if kinds.count(obj.kind) > 1:
                assert f"the {obj.kind}" not in obj.expressions


def test_answers_of_questions_match_the_objects():
    for seed in range(80):
        scene = generate_scene(seed, (240, 320))
        objs = scene.objects
        types = {q.type for q in scene.questions}
        assert {"describe", "count", "presence"} <= types
        for q in scene.questions:
            if q.type == "colour":
                assert q.answer == objs[q.target].colour
                assert _resolve(scene, re.fullmatch(r"what colour is (.+)\?", q.question)[1]) == [objs[q.target]]
            elif q.type == "position":
                assert q.answer == position_word(objs[q.target].facts.cx)
            elif q.type == "kind":
                assert q.answer == objs[q.target].kind
            elif q.type == "count" and (m := re.fullmatch(r"how many (\w+) are there\?", q.question)):
                kind = {v: k for k, v in PLURALS.items()}.get(m[1])
                n = len(objs) if m[1] == "objects" else sum(o.kind == kind for o in objs)
                assert q.answer == NUMBER_WORDS[n]
            elif q.type == "presence":
                words = re.fullmatch(r"is there an? (.+)\?", q.question)[1].split()
                present = any(o.kind == words[-1] and (len(words) == 1 or o.colour == words[0]) for o in objs)
                assert q.answer == ("yes" if present else "no"), q
            elif q.type == "instruction" and q.target is not None:
                assert q.answer == objs[q.target].answer
        answers = [q.answer for q in scene.questions if q.type == "presence"]
        assert "yes" in answers and "no" in answers


def test_answer_sentence_and_description_name_the_objects():
    scene = generate_scene(3, (480, 640))
    for obj in scene.objects:
        assert obj.answer.endswith(".") and obj.kind in obj.answer
        assert f"{obj.colour} {obj.kind}" in scene.description
    assert scene.description.count(",") + (" and " in scene.description) == len(scene.objects) - 1


def test_splits_are_disjoint_seed_ranges():
    assert split_of_seed(0) == "train" and split_of_seed(999_999) == "train"
    assert list(split_seeds("val", 3)) == [1_000_000, 1_000_001, 1_000_002]
    assert split_of_seed(split_seeds("test", 1)[0]) == "test"
    with pytest.raises(ValueError):
        split_seeds("holdout", 1)
    with pytest.raises(ValueError):
        generate_scene(0, (32, 32))


# --- expressions that name nothing, plural expressions, instance scenes (issue #18) ---

def test_absent_expressions_name_nothing_in_their_scene():
    from flmm_ros.tabletop.language import ABSENT_REASONS, FAR_DISTANCE
    reasons = set()
    for seed in range(150):
        scene = generate_scene(seed, (240, 320))
        objs = scene.objects
        assert scene.absent, seed
        for a in scene.absent:
            reasons.add(a.reason)
            words = a.expression.split()
            if a.reason == "colour and kind":
                assert not any(o.colour == words[1] and o.kind == words[2] for o in objs), a
            elif a.reason == "kind":
                assert not any(o.kind == words[1] for o in objs), a
            elif a.reason == "colour":
                assert not any(o.colour == words[1] for o in objs), a
            elif a.reason == "plural":
                kind = {v: k for k, v in PLURALS.items()}[words[-1]]
                assert not any(o.kind == kind for o in objs), a
            else:
                m = re.fullmatch(r"the (\w+) next to (the .+)", a.expression)
                (anchor,) = _resolve(scene, m[2])
                same = _candidates(scene, m[1])
                assert same and all(_dist(o, anchor) >= FAR_DISTANCE for o in same), a
    assert reasons == set(ABSENT_REASONS)


def test_group_expressions_name_every_object_of_their_kind_or_colour():
    found = set()
    for seed in range(150):
        scene = generate_scene(seed, (240, 320))
        for g in scene.groups:
            words = g.expression.split()
            named = [i for i, o in enumerate(scene.objects)
                     if (o.kind in (words[-1], {v: k for k, v in PLURALS.items()}.get(words[-1])))
                     or (words[-1] in ("object", "objects") and o.colour == words[-2])]
            if words[-1] not in ("object", "objects") and words[-2] in COLOURS:   # "the red mugs"
                named = [i for i in named if scene.objects[i].colour == words[-2]]
            assert g.targets == tuple(named) and len(named) >= 2, (seed, g)
            found.add(" ".join(w if w not in COLOURS + KINDS + tuple(PLURALS.values()) else "X" for w in words))
    assert {"the X", "all the X", "every X", "both X", "all the X objects", "every X object", "the X X"} <= found


def test_instance_scenes_hold_two_to_four_objects_of_the_named_kind_some_touching():
    from flmm_ros.tabletop.scenes import INSTANCE_COUNTS, generate_instance_scene
    counts, touching = [], 0
    for seed in range(60):
        scene, kind = generate_instance_scene(seed, (240, 320))
        again, _ = generate_instance_scene(seed, (240, 320))
        assert np.array_equal(scene.image, again.image)
        named = [o for o in scene.objects if o.kind == kind]
        counts.append(len(named))
        assert len(scene.objects) > len(named)            # and an object of another kind
        cover = np.sum([o.mask for o in scene.objects], axis=0)
        assert cover.max() <= 1                            # exact, disjoint instance masks
        grown = [np.pad(o.mask, 2)[:-4, 2:-2] | np.pad(o.mask, 2)[4:, 2:-2] | np.pad(o.mask, 2)[2:-2, :-4]
                 | np.pad(o.mask, 2)[2:-2, 4:] for o in named]
        touching += any((grown[a] & named[b].mask).any() for a in range(len(named)) for b in range(len(named))
                        if a != b)
        if len(named) >= 2:
            assert any(set(g.targets) == {i for i, o in enumerate(scene.objects) if o.kind == kind}
                       for g in scene.groups)
    assert set(counts) >= set(INSTANCE_COUNTS) and sum(c in INSTANCE_COUNTS for c in counts) >= 0.95 * len(counts)
    assert touching >= 0.3 * len(counts)
    assert not np.array_equal(generate_instance_scene(0, (240, 320))[0].image, generate_scene(0, (240, 320)).image)
