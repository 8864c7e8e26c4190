"""The generated tabletop scenes as referring-segmentation samples (`RefSample`) for the grounding tools."""
from __future__ import annotations

import random
from collections.abc import Iterator

from ..grounding.training.data import RefSample
from .scenes import generate_scene, split_seeds


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
