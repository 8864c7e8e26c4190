"""Procedural tabletop scenes with exact instance masks, referring expressions and questions.

`generate_scene(seed, size=(H, W))` is deterministic: the same seed and size give the same
pixels, masks and sentences. A scene is a wall and a textured table seen from above the table's
front edge, with 1-5 objects (kinds in `shapes.KINDS`, colours in `language.COLOURS`). Objects are
drawn back to front by the line they stand on, so nearer objects occlude farther ones; an
object's mask is exactly its *visible* pixels, the masks are disjoint, and every object keeps at
least `MIN_VISIBLE` of its silhouette. Geometry is in units of min(H, W), so one seed looks alike at
256x256 and at 640x480.

Splits are seed ranges: train seeds are below 1_000_000, val starts at 1_000_000, test at 2_000_000.

Every scene also lists expressions that name nothing in it (`Scene.absent`) and plural ones that name several
objects (`Scene.groups`), drawn from their own random stream so the scene itself is unchanged.
`generate_instance_scene(seed, size)` makes scenes with 2-4 objects of one kind (half of them side by side,
touching or occluding each other) and one or two objects of other kinds: the instance-separation test set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import language
from .language import COLOURS, AbsentExpression, GroupExpression, ObjectFacts, QAPair
from .shapes import KIND_SIZES, KINDS, RENDERERS, Sprite

SPLIT_SEED_START = {"train": 0, "val": 1_000_000, "test": 2_000_000}
SPLIT_SIZE = 1_000_000
MIN_VISIBLE = 0.6          # fraction of an object's silhouette that must stay visible
MAX_OBJECTS = 5
# Random streams of the extra expressions and of the instance scenes: seeded by (seed, stream), never by the
# scene's own stream, so adding them changed no existing scene.
ABSENT_STREAM, INSTANCE_STREAM = 18, 1018
INSTANCE_COUNTS = (2, 3, 4)      # objects of the named kind in an instance scene

COLOUR_RGB = {
    "red": (0.80, 0.12, 0.12),
    "green": (0.15, 0.62, 0.20),
    "blue": (0.15, 0.30, 0.82),
    "yellow": (0.92, 0.80, 0.12),
    "orange": (0.96, 0.50, 0.08),
    "purple": (0.50, 0.20, 0.66),
    "white": (0.93, 0.93, 0.91),
}
# Desaturated surfaces, so that no table or wall reads as an object colour.
WALL_RGB = [(0.82, 0.82, 0.80), (0.78, 0.74, 0.66), (0.70, 0.76, 0.82), (0.62, 0.62, 0.64), (0.86, 0.80, 0.74)]
TABLE_RGB = [(0.52, 0.36, 0.22), (0.40, 0.28, 0.18), (0.46, 0.46, 0.46), (0.34, 0.36, 0.40),
             (0.60, 0.52, 0.40), (0.30, 0.30, 0.30)]
TABLE_TEXTURES = ("wood", "plain", "cloth")


@dataclass(frozen=True)
class SceneObject:
    kind: str
    colour: str
    mask: np.ndarray                 # (H, W) bool: the visible pixels
    box: tuple[int, int, int, int]   # x0, y0, x1, y1 of the visible pixels, x1/y1 exclusive
    facts: ObjectFacts
    expressions: tuple[str, ...]     # each refers to this object only
    answer: str                      # the robot's sentence, e.g. "the red mug is on the left."


@dataclass(frozen=True)
class Scene:
    seed: int
    image: np.ndarray                # (H, W, 3) uint8 RGB
    objects: tuple[SceneObject, ...]  # in drawing order: back to front
    questions: tuple[QAPair, ...]
    description: str
    absent: tuple[AbsentExpression, ...] = ()   # expressions naming nothing in the scene
    groups: tuple[GroupExpression, ...] = ()    # plural expressions, each naming two or more objects

    def referring_pairs(self) -> list[tuple[str, np.ndarray]]:
        """(expression, visible mask) for every expression of every object."""
        return [(e, o.mask) for o in self.objects for e in o.expressions]


@dataclass
class _Placed:
    kind: str
    colour: str
    sprite: Sprite
    x0: int          # sprite origin in the image
    y0: int
    base_y: float


def split_of_seed(seed: int) -> str:
    for split, start in SPLIT_SEED_START.items():
        if start <= seed < start + SPLIT_SIZE:
            return split
    raise ValueError(f"seed {seed} is outside every split range {SPLIT_SEED_START}")


def split_seeds(split: str, count: int, offset: int = 0) -> range:
    if split not in SPLIT_SEED_START:
        raise ValueError(f"unknown split {split!r}: use one of {sorted(SPLIT_SEED_START)}")
    if offset + count > SPLIT_SIZE:
        raise ValueError(f"{split} has only {SPLIT_SIZE} seeds")
    start = SPLIT_SEED_START[split] + offset
    return range(start, start + count)


def _background(rng: np.random.Generator, h: int, w: int, horizon: int) -> np.ndarray:
    wall = np.array(WALL_RGB[rng.integers(len(WALL_RGB))], np.float32) * rng.uniform(0.9, 1.05)
    table = np.array(TABLE_RGB[rng.integers(len(TABLE_RGB))], np.float32) * rng.uniform(0.85, 1.1)
    texture = TABLE_TEXTURES[rng.integers(len(TABLE_TEXTURES))]
    xx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    ty = np.linspace(0.0, 1.0, h - horizon, dtype=np.float32)[:, None]  # table: 0 at its back edge, 1 at the front
    if texture == "wood":
        freq, wobble = rng.uniform(15, 40), rng.uniform(0.5, 2.0)
        pattern = 1.0 + 0.08 * np.sin(2 * np.pi * (xx * freq + wobble * np.sin(ty * 7 + xx * 3)))
    elif texture == "cloth":
        cells = rng.uniform(6, 14)
        # Checks widen towards the camera, like a cloth seen in perspective.
        u = np.floor((xx - 0.5) * cells / (0.6 + 0.4 * ty) + 100).astype(np.int32)
        v = np.floor(np.log1p(4 * ty) * cells * 0.8).astype(np.int32)
        pattern = 1.0 - 0.1 * ((u + v) % 2).astype(np.float32)
    else:
        pattern = 1.0 + 0.03 * np.sin(2 * np.pi * (xx * 3 + ty * 2))
    img = np.empty((h, w, 3), np.float32)
    img[horizon:] = table * (pattern * (0.85 + 0.2 * ty))[..., None]
    wall_rows = wall * (0.92 + 0.1 * np.linspace(0.0, 1.0, h, dtype=np.float32)[:horizon, None])
    img[:horizon] = wall_rows[:, None, :]
    img[horizon:horizon + max(1, h // 80)] *= 0.7   # the table's back edge
    return img


def _sample_object(rng: np.random.Generator, kind: str, colour: str, h: int, w: int,
                   horizon: int, light_x: float, beside: _Placed | None = None) -> _Placed | None:
    """An object at a random place, or, with `beside`, standing next to that one (touching or overlapping it)."""
    s = min(h, w)
    if beside is None:
        depth = rng.uniform(0.0, 1.0)            # 0 = table's back edge, 1 = the image's bottom
    else:
        depth = float((beside.base_y - horizon) / (h - horizon) / 0.84 - 0.12 / 0.84 + rng.uniform(-0.08, 0.08))
        if not 0.0 < depth < 1.0:    # not clipped: two objects on one line would cover each other unchecked
            return None
    base_y = horizon + (0.12 + 0.84 * depth) * (h - horizon)
    scale = rng.uniform(0.85, 1.25) * (0.8 + 0.4 * depth) * s
    bw, bh = KIND_SIZES[kind]
    rgb = np.clip(np.array(COLOUR_RGB[colour], np.float32) + rng.uniform(-0.05, 0.05, 3), 0, 1).astype(np.float32)
    extra = {"handle_right": bool(rng.integers(2))} if kind == "mug" else {}
    sprite = RENDERERS[kind](bw * scale, bh * scale, rgb, light_x, **extra)
    sh, sw = sprite.mask.shape
    ax, ay = sprite.anchor
    margin = 0.02 * s
    lo, hi = ax + margin, w - (sw - ax) - margin
    if hi <= lo:
        return None
    if beside is None:
        x0 = int(round(rng.uniform(lo, hi) - ax))
    else:   # centre one sprite width (70-100 %) to either side of the other's centre
        bx = beside.x0 + beside.sprite.anchor[0]
        x = bx + rng.choice([-1, 1]) * rng.uniform(0.7, 1.0) * 0.5 * (sw + beside.sprite.mask.shape[1])
        if not lo <= x <= hi:
            return None
        x0 = int(round(x - ax))
    y0 = int(round(base_y - ay))
    if y0 < margin or y0 + sh > h - 1:
        return None
    return _Placed(kind, colour, sprite, x0, y0, base_y)


def _visible_fractions(placed: list[_Placed]) -> list[float]:
    """Fraction of each silhouette not covered by objects standing nearer the camera."""
    fractions = []
    for p in placed:
        sh, sw = p.sprite.mask.shape
        covered = np.zeros((sh, sw), bool)
        for q in placed:
            if q is p or q.base_y <= p.base_y:
                continue
            qh, qw = q.sprite.mask.shape
            ya, yb = max(p.y0, q.y0), min(p.y0 + sh, q.y0 + qh)
            xa, xb = max(p.x0, q.x0), min(p.x0 + sw, q.x0 + qw)
            if ya >= yb or xa >= xb:
                continue
            covered[ya - p.y0:yb - p.y0, xa - p.x0:xb - p.x0] |= q.sprite.mask[ya - q.y0:yb - q.y0, xa - q.x0:xb - q.x0]
        total = p.sprite.mask.sum()
        fractions.append(float((p.sprite.mask & ~covered).sum() / max(1, total)))
    return fractions


def _layout(rng: np.random.Generator, h: int, w: int, horizon: int, light_x: float,
            colours: tuple[str, ...]) -> list[_Placed]:
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    placed: list[_Placed] = []
    for _ in range(count):
        kind = KINDS[rng.integers(len(KINDS))]
        colour = colours[rng.integers(len(colours))]
        for _attempt in range(30):
            cand = _sample_object(rng, kind, colour, h, w, horizon, light_x)
            if cand is None:
                continue
            if min(_visible_fractions(placed + [cand])) >= MIN_VISIBLE:
                placed.append(cand)
                break
    return sorted(placed, key=lambda p: p.base_y)   # back to front


def _instance_layout(rng: np.random.Generator, h: int, w: int, horizon: int, light_x: float, kind: str,
                     count: int, side_by_side: bool) -> list[_Placed]:
    """`count` objects of `kind` (side by side: each next to one placed before) and one or two of other kinds."""
    placed: list[_Placed] = []
    others = [k for k in KINDS if k != kind]
    kinds = [kind] * count + [others[i] for i in rng.integers(len(others), size=int(rng.integers(1, 3)))]
    for n, k in enumerate(kinds):
        colour = COLOURS[rng.integers(len(COLOURS))]
        for _attempt in range(60):
            beside = placed[int(rng.integers(len(placed)))] if side_by_side and 0 < n < count else None
            cand = _sample_object(rng, k, colour, h, w, horizon, light_x, beside)
            if cand is not None and min(_visible_fractions(placed + [cand])) >= MIN_VISIBLE:
                placed.append(cand)
                break
    return sorted(placed, key=lambda p: p.base_y)


def _draw_shadows(img: np.ndarray, placed: list[_Placed], light_x: float) -> None:
    h, w = img.shape[:2]
    for p in placed:
        sw = p.sprite.mask.shape[1]
        cx = p.x0 + p.sprite.anchor[0] - 0.25 * light_x * sw
        rx, ry = 0.6 * sw, 0.1 * sw + 1
        x0, x1 = max(0, int(cx - rx)), min(w, int(cx + rx) + 1)
        y0, y1 = max(0, int(p.base_y - ry)), min(h, int(p.base_y + ry) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        d = ((xx - cx) / rx) ** 2 + ((yy - p.base_y) / ry) ** 2
        img[y0:y1, x0:x1] *= (1.0 - 0.35 * np.clip(1.0 - d, 0.0, 1.0))[..., None]


def _facts(p: _Placed, h: int, w: int) -> ObjectFacts:
    ys, xs = np.nonzero(p.sprite.mask)
    s = min(h, w)
    cx, cy = p.x0 + xs.mean() + 0.5, p.y0 + ys.mean() + 0.5
    return ObjectFacts(kind=p.kind, colour=p.colour, cx=float(cx / w), base_y=float(p.base_y / h),
                       x=float(cx / s), y=float(cy / s), area=float(len(xs) / (h * w)))


def generate_scene(seed: int, size: tuple[int, int] = (256, 256), colours: tuple[str, ...] = COLOURS) -> Scene:
    """A random tabletop scene, identical for identical (seed, size, colours).

    `colours` narrows the palette (training scenes where colour cannot tell the objects apart)."""
    h, w = int(size[0]), int(size[1])
    if h < 64 or w < 64:
        raise ValueError(f"scene size must be at least 64x64, got {h}x{w}")
    if not colours or set(colours) - set(COLOURS):
        raise ValueError(f"colours must be a non-empty subset of {COLOURS}, got {colours}")
    rng = np.random.default_rng(seed)
    horizon = int(h * rng.uniform(0.22, 0.42))
    light_x = float(rng.uniform(-1, 1))
    img = _background(rng, h, w, horizon)
    placed = _layout(rng, h, w, horizon, light_x, tuple(colours))
    return _render(seed, rng, img, placed, light_x)


def generate_instance_scene(seed: int, size: tuple[int, int] = (256, 256), kind: str | None = None,
                            count: int | None = None, side_by_side: bool | None = None) -> tuple[Scene, str]:
    """A scene with `count` (2-4) objects of `kind` and one or two of other kinds; (scene, kind).

    Deterministic per (seed, size) like `generate_scene`, from its own random stream. `side_by_side` (half of the
    scenes when None) places each object of the kind next to another one, touching or occluding it. An object
    that found no free place after many tries is left out, so check the count in `scene.objects`."""
    h, w = int(size[0]), int(size[1])
    if h < 64 or w < 64:
        raise ValueError(f"scene size must be at least 64x64, got {h}x{w}")
    if kind is not None and kind not in KINDS or count is not None and count not in INSTANCE_COUNTS:
        raise ValueError(f"kind must be one of {KINDS} and count one of {INSTANCE_COUNTS}, got {kind!r}, {count!r}")
    rng = np.random.default_rng([seed, INSTANCE_STREAM])
    kind = kind or KINDS[rng.integers(len(KINDS))]
    count = count or int(rng.choice(INSTANCE_COUNTS))
    side_by_side = bool(rng.random() < 0.5) if side_by_side is None else side_by_side
    horizon = int(h * rng.uniform(0.22, 0.42))
    light_x = float(rng.uniform(-1, 1))
    img = _background(rng, h, w, horizon)
    placed = _instance_layout(rng, h, w, horizon, light_x, kind, count, side_by_side)
    return _render(seed, rng, img, placed, light_x), kind


def _render(seed: int, rng: np.random.Generator, img: np.ndarray, placed: list[_Placed], light_x: float) -> Scene:
    """Shadows, objects, lighting and noise onto the background; masks, facts and every sentence of the scene."""
    h, w = img.shape[:2]
    _draw_shadows(img, placed, light_x)

    labels = np.full((h, w), -1, np.int16)
    for k, p in enumerate(placed):
        sh, sw = p.sprite.mask.shape
        region = (slice(p.y0, p.y0 + sh), slice(p.x0, p.x0 + sw))
        img[region][p.sprite.mask] = p.sprite.rgb[p.sprite.mask]
        labels[region][p.sprite.mask] = k

    # Lighting over the whole picture: exposure, a left-right fall-off and a colour cast, then sensor noise.
    gain = rng.uniform(0.8, 1.15) * (1.0 + 0.12 * light_x * np.linspace(-1, 1, w, dtype=np.float32))
    cast = 1.0 + rng.uniform(-0.04, 0.04, 3).astype(np.float32)
    img *= (255.0 * gain[None, :, None]) * cast[None, None, :]
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 3.0 + 0.5
    image = np.clip(img, 0.0, 255.0).astype(np.uint8)

    facts = [_facts(p, h, w) for p in placed]
    exprs = language.referring_expressions(facts)
    answers = [language.answer_sentence(f, e) for f, e in zip(facts, exprs)]
    objects = []
    for k, p in enumerate(placed):
        region = (slice(p.y0, p.y0 + p.sprite.mask.shape[0]), slice(p.x0, p.x0 + p.sprite.mask.shape[1]))
        mask = np.zeros((h, w), bool)
        mask[region] = labels[region] == k
        ys, xs = np.nonzero(mask[region])
        box = (p.x0 + int(xs.min()), p.y0 + int(ys.min()), p.x0 + int(xs.max()) + 1, p.y0 + int(ys.max()) + 1)
        objects.append(SceneObject(p.kind, p.colour, mask, box, facts[k], tuple(exprs[k]), answers[k]))
    qa = language.questions(facts, exprs, answers, rng)
    extra = np.random.default_rng([seed, ABSENT_STREAM])
    return Scene(seed, image, tuple(objects), tuple(qa), language.describe(facts),
                 tuple(language.absent_expressions(facts, extra)), tuple(language.group_expressions(facts)))
