"""Short tabletop video sequences with exact per-frame masks, for evaluating tracking.

`generate_sequence(seed, size, scenario)` builds a small world (a wall, a textured table and objects drawn
with `shapes.RENDERERS`, like `scenes.generate_scene`) and films it with a moving camera for 30-90 frames:

- pan:       the camera pans sideways (and a little up/down); objects that were out of view come in;
- zoom:      the camera zooms in and back out (factor 0.75-1.45) about a drifting centre;
- shift:     objects slide along the table, the camera drifts;
- occlusion: a nearer, bigger box slides across in front of the target, hiding it completely for a while;
- reentry:   the camera pans until the target has left the view, holds, and pans back.

Every frame is rendered at the output resolution from the world (sprites re-drawn at the camera's zoom,
the background evaluated at world coordinates), so a frame's masks are exactly the visible pixels of each
object, disjoint, possibly empty. Frames are rendered on demand (`frame(t)`), deterministically: the same
(seed, size, scenario) gives the same pixels. The targets are objects whose phrase ("the red mug") names
exactly one object of the whole world, in view at frame 0 with at least `scenes.MIN_VISIBLE` of it showing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import language
from .language import COLOURS, ObjectFacts
from .scenes import COLOUR_RGB, MIN_VISIBLE, TABLE_RGB, TABLE_TEXTURES, WALL_RGB, _draw_shadows, _Placed
from .shapes import KIND_SIZES, KINDS, RENDERERS

SCENARIOS = ("pan", "zoom", "shift", "occlusion", "reentry")
LENGTHS = {"pan": (30, 90), "zoom": (30, 90), "shift": (30, 90), "occlusion": (60, 90), "reentry": (60, 90)}
OCCLUDABLE = ("mug", "ball", "can")       # kinds short enough for a box in front to hide them


@dataclass(frozen=True)
class SequenceObject:
    """One object of the world; `x[t]` is where it stands (world px) in frame t."""
    kind: str
    colour: str
    rgb: tuple[float, float, float]
    width: float                     # body size in world px (KIND_SIZES x scale)
    height: float
    handle_right: bool
    base_y: float                    # world y of the line it stands on (larger = nearer the camera)
    x: np.ndarray                    # (T,) world x of its base centre per frame
    expressions: tuple[str, ...]     # each names this object only, among all objects of the world


@dataclass(frozen=True)
class SequenceFrame:
    index: int
    image: np.ndarray                # (H, W, 3) uint8 RGB
    masks: np.ndarray                # (K, H, W) bool: visible pixels of each object (disjoint, may be empty)
    silhouette_areas: np.ndarray     # (K,) pixels of each whole silhouette at this zoom (in view or not)
    in_view_areas: np.ndarray        # (K,) pixels of each silhouette inside the image, occluded or not

    def visible_fraction(self, k: int) -> float:
        return float(self.masks[k].sum() / max(1, self.silhouette_areas[k]))


@dataclass(frozen=True)
class TrackingSequence:
    seed: int
    size: tuple[int, int]            # (H, W)
    scenario: str
    objects: tuple[SequenceObject, ...]
    targets: tuple[int, ...]         # indices of objects to ground on frame 0 and track
    phrases: tuple[str, ...]         # one phrase per target
    camera: np.ndarray               # (T, 3): world x, y of the view centre and zoom, per frame
    _look: tuple                     # background and lighting parameters (private)

    @property
    def length(self) -> int:
        return len(self.camera)

    def frame(self, t: int) -> SequenceFrame:
        if not 0 <= t < self.length:
            raise IndexError(f"frame {t} of a {self.length}-frame sequence")
        return _render(self, t)

    def frames(self):
        return (self.frame(t) for t in range(self.length))


def _smooth(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _view_coords(seq: TrackingSequence, t: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = seq.size
    cx, cy, zoom = seq.camera[t]
    xs = cx + (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / zoom
    ys = cy + (np.arange(h, dtype=np.float32) + 0.5 - h / 2) / zoom
    return xs, ys


def _background(seq: TrackingSequence, t: int) -> np.ndarray:
    """scenes._background's wall and table, evaluated at the world coordinates of this view."""
    h, w = seq.size
    wall, table, texture, params, horizon = seq._look[:5]
    xs, ys = _view_coords(seq, t)
    xx = (xs / w)[None, :]
    ty = np.clip((ys - horizon) / (h - horizon), 0.0, 1.5)[:, None]
    if texture == "wood":
        freq, wobble = params
        pattern = 1.0 + 0.08 * np.sin(2 * np.pi * (xx * freq + wobble * np.sin(ty * 7 + xx * 3)))
    elif texture == "cloth":
        cells = params[0]
        u = np.floor((xx - 0.5) * cells / (0.6 + 0.4 * ty) + 100).astype(np.int32)
        v = np.floor(np.log1p(4 * ty) * cells * 0.8).astype(np.int32)
        pattern = 1.0 - 0.1 * ((u + v) % 2).astype(np.float32)
    else:
        pattern = 1.0 + 0.03 * np.sin(2 * np.pi * (xx * 3 + ty * 2))
    on_table = (ys >= horizon)[:, None, None]
    table_rgb = np.asarray(table, np.float32) * (pattern * (0.85 + 0.2 * ty))[..., None]
    wall_rgb = np.asarray(wall, np.float32) * (0.92 + 0.1 * np.clip(ys / h, 0, 1.5))[:, None, None]
    img = np.where(on_table, table_rgb, np.broadcast_to(wall_rgb, (h, w, 3))).astype(np.float32)
    edge = (ys >= horizon) & (ys < horizon + max(1, h // 80))
    img[edge] *= 0.7                                    # the table's back edge
    return img


def _placed(seq: TrackingSequence, t: int) -> list[_Placed]:
    """Every object drawn at this frame's zoom, with its sprite origin in view pixels."""
    h, w = seq.size
    cx, cy, zoom = seq.camera[t]
    light_x = seq._look[5]
    out = []
    for obj in seq.objects:
        extra = {"handle_right": obj.handle_right} if obj.kind == "mug" else {}
        sprite = RENDERERS[obj.kind](obj.width * zoom, obj.height * zoom, np.asarray(obj.rgb, np.float32),
                                     light_x, **extra)
        u = (obj.x[t] - cx) * zoom + w / 2
        v = (obj.base_y - cy) * zoom + h / 2
        ax, ay = sprite.anchor
        out.append(_Placed(obj.kind, obj.colour, sprite, int(round(u - ax)), int(round(v - ay)), v))
    return out


def _render(seq: TrackingSequence, t: int) -> SequenceFrame:
    h, w = seq.size
    img = _background(seq, t)
    placed = _placed(seq, t)
    light_x, gain_base, slope, cast = seq._look[5:9]
    order = sorted(range(len(placed)), key=lambda k: placed[k].base_y)    # back to front
    _draw_shadows(img, [placed[k] for k in order], light_x)
    labels = np.full((h, w), -1, np.int16)
    in_view = np.zeros(len(placed), np.int64)
    for k in order:
        p = placed[k]
        sh, sw = p.sprite.mask.shape
        y0, y1, x0, x1 = max(0, p.y0), min(h, p.y0 + sh), max(0, p.x0), min(w, p.x0 + sw)
        if y0 >= y1 or x0 >= x1:
            continue
        sprite_mask = p.sprite.mask[y0 - p.y0:y1 - p.y0, x0 - p.x0:x1 - p.x0]
        img[y0:y1, x0:x1][sprite_mask] = p.sprite.rgb[y0 - p.y0:y1 - p.y0, x0 - p.x0:x1 - p.x0][sprite_mask]
        labels[y0:y1, x0:x1][sprite_mask] = k
        in_view[k] = sprite_mask.sum()
    gain = gain_base * (1.0 + slope * np.linspace(-1, 1, w, dtype=np.float32))
    img *= (255.0 * gain[None, :, None]) * np.asarray(cast, np.float32)[None, None, :]
    noise = np.random.default_rng([seq.seed, 7, t]).standard_normal((h, w, 1), dtype=np.float32)
    img += noise * 3.0 + 0.5
    masks = labels[None] == np.arange(len(placed), dtype=np.int16)[:, None, None]
    areas = np.array([p.sprite.mask.sum() for p in placed], np.int64)
    return SequenceFrame(t, np.clip(img, 0, 255).astype(np.uint8), masks, areas, in_view)


# ---- building a world ----------------------------------------------------------------------------
def _new_object(rng, kind: str, colour: str, s: float, horizon: float, h: int, depth: float | None = None,
                scale: float | None = None) -> dict:
    depth = rng.uniform(0.0, 1.0) if depth is None else depth
    base_y = horizon + (0.12 + 0.84 * depth) * (h - horizon)
    scale = scale if scale is not None else rng.uniform(0.85, 1.25) * (0.8 + 0.4 * depth) * s
    bw, bh = KIND_SIZES[kind]
    rgb = np.clip(np.array(COLOUR_RGB[colour]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    return {"kind": kind, "colour": colour, "rgb": tuple(float(c) for c in rgb), "width": bw * scale,
            "height": bh * scale, "handle_right": bool(rng.integers(2)), "base_y": float(base_y), "x": None}


def _half_width(o: dict) -> float:
    return 0.5 * o["width"] * (1.6 if o["kind"] == "mug" else 1.0) + 0.05 * o["width"]


def _facts(o: dict, h: int, w: int) -> ObjectFacts:
    s = min(h, w)
    x = float(o["x"][0])
    return ObjectFacts(kind=o["kind"], colour=o["colour"], cx=x / w, base_y=o["base_y"] / h, x=x / s,
                       y=(o["base_y"] - o["height"] / 2) / s, area=o["width"] * o["height"] / (h * w))


def _name(expressions: list[str]) -> str | None:
    """A phrase that holds in every frame: colour and/or kind, never a place, size or neighbour."""
    plain = [e for e in expressions if not language.is_positional(e) and " next to " not in e
             and not e.startswith(("the big ", "the large ", "the small "))]
    return plain[0] if plain else None


def generate_sequence(seed: int, size: tuple[int, int] = (256, 256), scenario: str | None = None,
                      length: int | None = None) -> TrackingSequence:
    """A sequence of `scenario` (default: chosen by the seed); `length` defaults to a seeded value in
    LENGTHS[scenario]. Raises ValueError for unknown scenarios and sizes below 64 px."""
    h, w = int(size[0]), int(size[1])
    if h < 64 or w < 64:
        raise ValueError(f"sequence size must be at least 64x64, got {h}x{w}")
    rng = np.random.default_rng([seed, 17])
    scenario = scenario or SCENARIOS[int(rng.integers(len(SCENARIOS)))]
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: use one of {SCENARIOS}")
    lo, hi = LENGTHS[scenario]
    length = int(length or rng.integers(lo, hi + 1))
    if length < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got {length}")
    for _attempt in range(50):
        built = _build(rng, seed, h, w, scenario, length)
        if built is not None:
            return built
    raise RuntimeError(f"no {scenario} sequence found for seed {seed} (please report)")


def _build(rng, seed: int, h: int, w: int, scenario: str, length: int) -> TrackingSequence | None:
    s = float(min(h, w))
    horizon = h * rng.uniform(0.22, 0.42)
    texture = TABLE_TEXTURES[rng.integers(len(TABLE_TEXTURES))]
    params = {"wood": (rng.uniform(15, 40), rng.uniform(0.5, 2.0)), "cloth": (rng.uniform(6, 14),)}.get(texture, ())
    light_x = float(rng.uniform(-1, 1))
    look = (tuple(np.array(WALL_RGB[rng.integers(len(WALL_RGB))]) * rng.uniform(0.9, 1.05)),
            tuple(np.array(TABLE_RGB[rng.integers(len(TABLE_RGB))]) * rng.uniform(0.85, 1.1)),
            texture, params, horizon, light_x, rng.uniform(0.8, 1.15), 0.12 * light_x,
            tuple(1.0 + rng.uniform(-0.04, 0.04, 3)))
    frames = np.arange(length, dtype=np.float64)
    u = frames / (length - 1)
    # Objects in view at frame 0 (like a generated scene), placed left to right with little overlap.
    count = int(rng.integers(2, 5))
    objs = []
    for _ in range(count):
        kind = KINDS[rng.integers(len(KINDS))]
        if scenario == "occlusion" and not objs:
            kind = OCCLUDABLE[rng.integers(len(OCCLUDABLE))]
        o = _new_object(rng, kind, COLOURS[rng.integers(len(COLOURS))], s, horizon, h)
        half = _half_width(o)
        if w - 2 * half - 0.04 * s <= 0:
            continue
        o["x"] = np.full(length, rng.uniform(half + 0.02 * s, w - half - 0.02 * s))
        objs.append(o)
    target = 0
    camera = np.tile([w / 2, h / 2, 1.0], (length, 1))
    if scenario == "pan":
        amp = rng.choice([-1, 1]) * rng.uniform(0.15, 0.4) * w
        camera[:, 0] += amp * np.sin(np.pi * u * rng.uniform(0.5, 2.0))     # out, or out and back
        camera[:, 1] += rng.uniform(-0.06, 0.06) * h * np.sin(np.pi * u)
        objs += _outside_objects(rng, s, horizon, h, w, length, np.sign(amp))
    elif scenario == "zoom":
        camera[:, 2] = 1.0 + (rng.uniform(0.75, 1.45) - 1.0) * np.sin(np.pi * u)
        camera[:, 0] += rng.uniform(-0.1, 0.1) * w * u
        camera[:, 1] += rng.uniform(-0.05, 0.08) * h * u
    elif scenario == "shift":
        for o in objs:
            o["x"] = o["x"] + rng.choice([-1, 1]) * rng.uniform(0.05, 0.25) * w * _smooth(1.4 * u - rng.uniform(0, 0.4))
        camera[:, 0] += rng.uniform(-0.06, 0.06) * w * u
    elif scenario == "occlusion":
        if not _add_occluder(rng, objs, s, h, w, length):
            return None
    elif scenario == "reentry":
        o = objs[target]
        half = _half_width(o)
        x0 = o["x"][0]
        # Pan until the target's whole silhouette is past the image edge it is nearer to, hold, pan back.
        amp = (x0 + half + 0.05 * s) if x0 < w / 2 else -(w - x0 + half + 0.05 * s)
        a = float(min(rng.uniform(0.15, 0.4, 2)))      # when the pan starts (two draws: kept for the seeds)
        hold = rng.uniform(0.1, 0.2)
        out = _smooth((u - a) / 0.2) - _smooth((u - (a + 0.2 + hold)) / 0.2)
        camera[:, 0] += amp * out
        objs += _outside_objects(rng, s, horizon, h, w, length, np.sign(amp))
    return _finish(seed, h, w, scenario, objs, camera, look, rng)


def _outside_objects(rng, s, horizon, h, w, length, direction) -> list[dict]:
    """0-2 objects beyond the image edge the camera pans towards: they come into view."""
    extra = []
    for _ in range(int(rng.integers(0, 3))):
        o = _new_object(rng, KINDS[rng.integers(len(KINDS))], COLOURS[rng.integers(len(COLOURS))], s, horizon, h)
        gap = rng.uniform(0.1, 0.6) * w
        o["x"] = np.full(length, w + gap if direction > 0 else -gap)
        extra.append(o)
    return extra


def _add_occluder(rng, objs: list[dict], s: float, h: int, w: int, length: int) -> bool:
    """A box standing just in front of the target, tall and wide enough to hide it, sliding across it."""
    t = objs[0]
    top = t["base_y"] - t["height"] * (1.5 if t["kind"] != "ball" else 1.0)
    gap = rng.uniform(0.02, 0.05) * s
    base_y = t["base_y"] + gap
    if base_y > h * 0.97:
        return False
    bw, bh = KIND_SIZES["box"]
    # The box's front face (bh) + lid (0.4 bw) must reach above the target's top.
    scale = max((base_y - top) / (bh + 0.4 * bw) * 1.15, 2.4 * _half_width(t) / bw)
    colour = [c for c in COLOURS if c != t["colour"]][rng.integers(len(COLOURS) - 1)]
    box = _new_object(rng, "box", colour, s, 0.0, h, scale=scale)
    box["base_y"] = float(base_y)
    travel = box["width"] / 2 + _half_width(t) + 0.05 * s
    direction = rng.choice([-1, 1])
    u = np.arange(length) / (length - 1)
    a = rng.uniform(0.0, 0.15)
    path = np.clip((u - a) / rng.uniform(0.7, 0.85), 0, 1)
    box["x"] = t["x"][0] + direction * travel * (2 * path - 1) * 1.1
    objs.append(box)
    return True


def _finish(seed, h, w, scenario, objs, camera, look, rng) -> TrackingSequence | None:
    facts = [_facts(o, h, w) for o in objs]
    exprs = language.referring_expressions(facts)
    seq = TrackingSequence(seed, (h, w), scenario, tuple(
        SequenceObject(o["kind"], o["colour"], o["rgb"], o["width"], o["height"], o["handle_right"], o["base_y"],
                       o["x"], tuple(e)) for o, e in zip(objs, exprs)), (), (), camera, look)
    first = seq.frame(0)
    targets, phrases = [], []
    for k, e in enumerate(exprs):
        name = _name(e)
        if name and first.visible_fraction(k) >= MIN_VISIBLE and first.in_view_areas[k] == first.silhouette_areas[k]:
            targets.append(k)
            phrases.append(name)
    # The scenario's own target (object 0: the one that is occluded or leaves the view) must be trackable.
    if 0 not in targets:
        return None
    if scenario in ("occlusion", "reentry"):
        if min(seq.frame(t).visible_fraction(0) for t in range(len(camera))) > 0.0:
            return None                     # the target never disappears completely
    return TrackingSequence(seq.seed, seq.size, scenario, seq.objects, tuple(targets), tuple(phrases), camera, look)
