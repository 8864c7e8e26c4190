"""The generated tabletop scenes as referring-segmentation samples (`RefSample`) for the grounding tools."""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import numpy as np

from ..grounding.training.data import RefSample
from .scenes import generate_instance_scene, generate_scene, split_seeds


def tabletop_samples(split: str, count: int, *, offset: int = 0, sizes=((256, 256), (480, 640)),
                     expression: str = "random") -> Iterator[RefSample]:
    """Generated tabletop scenes; one expression per object ('random' for training, 'first' for evaluation,
    like F-LMM's RefCOCO `select_first`)."""
    for i, seed in enumerate(split_seeds(split, count, offset)):
        scene = generate_scene(seed, size=sizes[i % len(sizes)])
        rng = random.Random(seed)
        # An object no expression singles out (e.g. two identical mugs side by side) is not referred to.
        objects = [o for o in scene.objects if o.expressions]
        if not objects:
            continue
        phrases = [rng.choice(o.expressions) if expression == "random" else o.expressions[0] for o in objects]
        cases = [distractor_case(o, scene.objects) for o in objects]
        yield RefSample(scene.image, phrases, [o.mask for o in objects], cases)


def distractor_case(obj, objects) -> str:
    """What else in the scene looks like the object: the hardest case for a model that finds it by colour."""
    if any(o is not obj and o.colour == obj.colour for o in objects):
        return "another object of its colour"
    if any(o is not obj and o.kind == obj.kind for o in objects):
        return "another object of its kind, no other of its colour"
    return "unique colour and kind"


def group_samples(split: str, count: int, *, offset: int = 0, sizes=((256, 256), (480, 640))) -> Iterator[RefSample]:
    """Instance scenes (`generate_instance_scene`: 2-4 objects of one kind, half of them side by side) as training
    samples for plural phrases: one random plural expression per group, its target the union of the group's
    masks, and one random expression of every object that has one (so singular phrases stay in the mix)."""
    for i, seed in enumerate(split_seeds(split, count, offset)):
        scene, _ = generate_instance_scene(seed, size=sizes[i % len(sizes)])
        rng = random.Random(seed)
        by_targets: dict[tuple[int, ...], list[str]] = {}
        for group in scene.groups:
            by_targets.setdefault(group.targets, []).append(group.expression)
        phrases, masks = [], []
        for targets, names in by_targets.items():
            phrases.append(rng.choice(names))
            masks.append(np.any([scene.objects[t].mask for t in targets], axis=0))
        for o in scene.objects:
            if o.expressions:
                phrases.append(rng.choice(o.expressions))
                masks.append(o.mask)
        if phrases:
            yield RefSample(scene.image, phrases, masks)


def mixed_samples(split: str, singular: int, groups: int) -> Iterator[RefSample]:
    """`singular` ordinary scenes (random expressions) and `groups` instance scenes, interleaved."""
    a, b = tabletop_samples(split, singular), group_samples(split, groups)
    for i in range(max(singular, groups)):
        for source, n in ((a, singular), (b, groups)):
            if i < n:
                yield from itertools.islice(source, 1)
