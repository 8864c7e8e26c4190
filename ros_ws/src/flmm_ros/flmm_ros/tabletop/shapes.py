"""Drawing one tabletop object on its own small canvas (NumPy only).

Every renderer returns a `Sprite`: a boolean mask of the object's full silhouette, its shaded RGB
colours (float 0..1) and the pixel inside the sprite that touches the table (the bottom centre).
Masks are hard (no anti-aliasing), so a pixel is either the object's colour or not: the scene's
instance masks are then exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("mug", "bowl", "ball", "box", "bottle", "can")

# Size of each kind in units of min(H, W), before the random scale and the perspective factor:
# (width, height) of the main body.
KIND_SIZES = {
    "mug": (0.22, 0.23),
    "bowl": (0.38, 0.17),
    "ball": (0.22, 0.22),
    "box": (0.26, 0.22),
    "bottle": (0.14, 0.44),
    "can": (0.16, 0.24),
}

_METAL = np.array([0.78, 0.78, 0.80], np.float32)
_CAP = np.array([0.18, 0.18, 0.20], np.float32)


@dataclass
class Sprite:
    mask: np.ndarray     # (h, w) bool, the full (unoccluded) silhouette
    rgb: np.ndarray      # (h, w, 3) float32 in 0..1; only meaningful where mask is True
    anchor: tuple[float, float]  # (x, y) in sprite pixels of the base centre (where it stands)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _ellipse(yy, xx, cy, cx, ry, rx) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _cylinder_shade(xx: np.ndarray, cx: float, half_w: float, light_x: float) -> np.ndarray:
    """Lambert shading of a vertical cylinder lit from the side `light_x` (-1 left .. 1 right)."""
    u = np.clip((xx - cx) / half_w, -1.0, 1.0)
    nz = np.sqrt(1.0 - u * u)
    lz = np.sqrt(max(0.0, 1.0 - 0.6 * light_x * light_x))
    diffuse = np.clip(u * 0.75 * light_x + nz * lz, 0.0, 1.0)
    return 0.45 + 0.6 * diffuse


def _highlight(xx: np.ndarray, cx: float, half_w: float, light_x: float) -> np.ndarray:
    """A vertical specular stripe on a cylinder, as a 0..1 blend weight towards white."""
    u = (xx - cx) / half_w
    return 0.35 * np.exp(-(((u - 0.45 * light_x) / 0.12) ** 2))


def _paint(shade: np.ndarray, colour: np.ndarray, spec: np.ndarray | float = 0.0) -> np.ndarray:
    rgb = shade[..., None] * colour[None, None, :]
    spec = np.asarray(spec, np.float32)
    if spec.ndim:
        spec = spec[..., None]
    return np.clip(rgb + (1.0 - rgb) * spec, 0.0, 1.0).astype(np.float32)


def draw_ball(width: float, height: float, colour: np.ndarray, light_x: float) -> Sprite:
    r = width / 2
    size = int(np.ceil(width)) + 2
    yy, xx = _grid(size, size)
    c = size / 2
    nx, ny = (xx - c) / r, (yy - c) / r
    mask = nx * nx + ny * ny <= 1.0
    nz = np.sqrt(np.clip(1.0 - nx * nx - ny * ny, 0.0, 1.0))
    light = np.array([light_x, -0.6, 0.8], np.float32)
    light /= np.linalg.norm(light)
    half = light + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half)
    diffuse = np.clip(nx * light[0] + ny * light[1] + nz * light[2], 0.0, 1.0)
    spec = 0.7 * np.clip(nx * half[0] + ny * half[1] + nz * half[2], 0.0, 1.0) ** 30
    return Sprite(mask, _paint(0.3 + 0.8 * diffuse, colour, spec), (c, c + r))


def draw_mug(width: float, height: float, colour: np.ndarray, light_x: float,
             handle_right: bool = True) -> Sprite:
    rim = 0.18 * width
    handle_w = 0.3 * width
    w = int(np.ceil(width + 2 * handle_w)) + 2
    h = int(np.ceil(height + 2 * rim)) + 2
    yy, xx = _grid(h, w)
    cx, top, bottom = w / 2, rim + 1, rim + 1 + height
    half = width / 2
    body = (np.abs(xx - cx) <= half) & (yy >= top) & (yy <= bottom)
    body |= _ellipse(yy, xx, bottom, cx, rim, half) | _ellipse(yy, xx, top, cx, rim, half)
    inside = _ellipse(yy, xx, top + 0.1 * rim, cx, 0.75 * rim, 0.86 * half)
    side = 1.0 if handle_right else -1.0
    hx, hy = cx + side * half, top + 0.45 * height
    ring = _ellipse(yy, xx, hy, hx, 0.3 * height, handle_w) & ~_ellipse(yy, xx, hy, hx, 0.15 * height, 0.45 * handle_w)
    handle = ring & (side * (xx - hx) > 0)
    shade = _cylinder_shade(xx, cx, half, light_x)
    shade = np.where(inside, 0.35 + 0.25 * (yy - top) / rim, shade)
    handle_lit = side * light_x > 0
    shade = np.where(handle & ~body, 0.85 if handle_lit else 0.65, shade)
    spec = np.where(body & ~inside, _highlight(xx, cx, half, light_x), 0.0)
    return Sprite(body | handle, _paint(shade, colour, spec), (cx, bottom + rim))


def draw_bowl(width: float, height: float, colour: np.ndarray, light_x: float) -> Sprite:
    rim = 0.14 * width
    w = int(np.ceil(width)) + 2
    h = int(np.ceil(height + rim)) + 2
    yy, xx = _grid(h, w)
    cx, rim_y, half = w / 2, rim + 1, width / 2
    body = _ellipse(yy, xx, rim_y, cx, height, half) & (yy >= rim_y)
    top = _ellipse(yy, xx, rim_y, cx, rim, half)
    inside = _ellipse(yy, xx, rim_y + 0.05 * rim, cx, 0.8 * rim, 0.93 * half)
    shade = _cylinder_shade(xx, cx, half, light_x) * (1.0 - 0.3 * np.clip((yy - rim_y) / height, 0, 1))
    shade = np.where(inside, 0.45 + 0.35 * (yy - (rim_y - rim)) / (2 * rim), shade)
    spec = np.where(body & ~top, _highlight(xx, cx, half, light_x), 0.0)
    return Sprite(body | top, _paint(shade, colour, spec), (cx, rim_y + height))


def draw_box(width: float, height: float, colour: np.ndarray, light_x: float) -> Sprite:
    depth = 0.4 * width
    dx = 0.45 * depth * (-1.0 if light_x > 0 else 1.0)  # show the side away from the light
    w = int(np.ceil(width + abs(dx))) + 2
    h = int(np.ceil(height + depth)) + 2
    yy, xx = _grid(h, w)
    x0 = 1 + (abs(dx) if dx < 0 else 0.0)
    top_y = 1 + depth
    front = (xx >= x0) & (xx <= x0 + width) & (yy >= top_y) & (yy <= top_y + height)
    v = (top_y - yy) / depth                # 0 at the front edge, 1 at the back edge of the lid
    u = xx - x0 - v * dx
    lid = (v >= 0) & (v <= 1) & (u >= 0) & (u <= width)
    edge_x = x0 + width if dx > 0 else x0
    t = (xx - edge_x) / dx                  # 0 at the front face's edge, 1 at the back
    side = (t >= 0) & (t <= 1) & (yy >= top_y - t * depth) & (yy <= top_y + height - t * depth)
    shade = np.where(lid, 1.15, np.where(front, 0.8, 0.55)).astype(np.float32)
    shade = shade * (1.0 - 0.15 * np.clip((yy - top_y) / height, 0, 1))
    return Sprite(front | lid | side, _paint(shade, colour), (x0 + width / 2, top_y + height))


def draw_bottle(width: float, height: float, colour: np.ndarray, light_x: float) -> Sprite:
    foot = 0.12 * width
    w = int(np.ceil(width)) + 2
    h = int(np.ceil(height + foot)) + 2
    yy, xx = _grid(h, w)
    cx, half = w / 2, width / 2
    top, bottom = 1.0, 1.0 + height
    shoulder_y = bottom - 0.6 * height
    neck_y = shoulder_y - 0.14 * height
    cap_y = top + 0.08 * height
    neck_half = 0.2 * width
    body = (np.abs(xx - cx) <= half) & (yy >= shoulder_y) & (yy <= bottom)
    body |= _ellipse(yy, xx, bottom, cx, foot, half)
    t = np.clip((yy - neck_y) / (shoulder_y - neck_y), 0, 1)
    body |= (yy >= neck_y) & (yy < shoulder_y) & (np.abs(xx - cx) <= neck_half + t * (half - neck_half))
    body |= (yy >= cap_y) & (yy < neck_y) & (np.abs(xx - cx) <= neck_half)
    cap = (yy >= top) & (yy < cap_y) & (np.abs(xx - cx) <= 1.15 * neck_half)
    rgb = _paint(_cylinder_shade(xx, cx, half, light_x), colour, _highlight(xx, cx, half, light_x))
    rgb[cap] = _paint(_cylinder_shade(xx, cx, neck_half, light_x), _CAP)[cap]
    return Sprite(body | cap, rgb, (cx, bottom + foot))


def draw_can(width: float, height: float, colour: np.ndarray, light_x: float) -> Sprite:
    rim = 0.16 * width
    w = int(np.ceil(width)) + 2
    h = int(np.ceil(height + 2 * rim)) + 2
    yy, xx = _grid(h, w)
    cx, half = w / 2, width / 2
    top, bottom = 1 + rim, 1 + rim + height
    body = ((np.abs(xx - cx) <= half) & (yy >= top) & (yy <= bottom)) | _ellipse(yy, xx, bottom, cx, rim, half)
    lid = _ellipse(yy, xx, top, cx, rim, half)
    band = (yy >= bottom - 0.08 * height) & body
    shade = _cylinder_shade(xx, cx, half, light_x)
    spec = _highlight(xx, cx, half, light_x)
    rgb = _paint(shade, colour, spec)
    metal = _paint(shade, _METAL, spec)
    rgb[band] = metal[band]
    rgb[lid] = _paint(np.full_like(xx, 1.05) - 0.25 * ((xx - cx) / half) ** 2, _METAL)[lid]
    return Sprite(body | lid, rgb, (cx, bottom + rim))


RENDERERS = {
    "mug": draw_mug,
    "bowl": draw_bowl,
    "ball": draw_ball,
    "box": draw_box,
    "bottle": draw_bottle,
    "can": draw_can,
}
