"""sensor_msgs/Image <-> numpy, for the encodings the node supports (cv_bridge is not always installed).

Rows are read through `step` (drivers may pad rows) and multi-byte pixels honour `is_bigendian`.
Anything else -- another encoding, a zero-size image, a data length that does not match -- raises
GroundingError with a message that says what was wrong.
"""
from __future__ import annotations

import array

import numpy as np
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from flmm_ros.geometry3d import depth_to_metres
from flmm_ros.grounding.types import GroundingError

# encoding -> (channels, the slice of them giving R, G, B); mono8 repeats its one channel.
COLOUR_ENCODINGS: dict[str, tuple[int, slice]] = {
    'rgb8': (3, slice(0, 3)),
    'bgr8': (3, slice(2, None, -1)),
    'rgba8': (4, slice(0, 3)),
    'bgra8': (4, slice(2, None, -1)),
    'mono8': (1, slice(0, 1)),        # broadcast to three channels
}
# encoding -> pixel type; 16UC1 is millimetres, 32FC1 metres (REP 118).
DEPTH_ENCODINGS: dict[str, np.dtype] = {
    '16UC1': np.dtype(np.uint16),
    '32FC1': np.dtype(np.float32),
}


def _pixels(msg: Image, dtype: np.dtype, channels: int) -> np.ndarray:
    """The image's pixels as an (H, W, channels) array of native-endian `dtype`, padding dropped."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise GroundingError(f"image has zero size ({width}x{height}, encoding '{msg.encoding}')")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise GroundingError(f"image step {step} is smaller than one row of {width} '{msg.encoding}' pixels "
                             f"({row_bytes} bytes)")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != step * height:
        raise GroundingError(f"image data has {data.size} bytes, expected step x height = {step} x {height} = "
                             f"{step * height} ({width}x{height} '{msg.encoding}')")
    rows = data.reshape(height, step)[:, :row_bytes]
    wire_type = dtype.newbyteorder('>' if msg.is_bigendian else '<')
    pixels = np.ascontiguousarray(rows).view(wire_type).reshape(height, width, channels)
    return pixels.astype(dtype.newbyteorder('='), copy=False)


def image_to_rgb(msg: Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB copy of a colour or mono8 image (what the grounding pipeline takes)."""
    if msg.encoding not in COLOUR_ENCODINGS:
        raise GroundingError(f"unsupported image encoding '{msg.encoding}': use one of "
                             f"{', '.join(COLOUR_ENCODINGS)}")
    channels, rgb = COLOUR_ENCODINGS[msg.encoding]
    pixels = _pixels(msg, np.dtype(np.uint8), channels)
    out = np.empty((*pixels.shape[:2], 3), np.uint8)
    out[...] = pixels[:, :, rgb]     # one copy through a view (a list index would gather, ~10x slower)
    return out


def image_to_depth(msg: Image) -> np.ndarray:
    """(H, W) float32 depth in metres from a 16UC1 (mm) or 32FC1 (m) image; 0 and NaN stay 'no reading'."""
    if msg.encoding not in DEPTH_ENCODINGS:
        raise GroundingError(f"unsupported depth encoding '{msg.encoding}': use 16UC1 (millimetres) or "
                             "32FC1 (metres)")
    pixels = _pixels(msg, DEPTH_ENCODINGS[msg.encoding], 1)[:, :, 0]
    return depth_to_metres(pixels, msg.encoding)


def _to_image(pixels: np.ndarray, encoding: str, header: Header | None) -> Image:
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width, msg.encoding = height, width, encoding
    msg.is_bigendian = 0
    msg.step = width * channels
    # array.array from bytes is one copy; assigning bytes would check every value in Python.
    msg.data = array.array('B', np.ascontiguousarray(pixels).tobytes())
    return msg


def rgb_to_image(rgb: np.ndarray, header: Header | None = None) -> Image:
    """rgb8 Image from an (H, W, 3) uint8 array."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.size == 0:
        raise GroundingError(f"rgb8 needs a non-empty (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    return _to_image(rgb, 'rgb8', header)


def mono_to_image(mono: np.ndarray, header: Header | None = None) -> Image:
    """mono8 Image from an (H, W) uint8 array (a mask or a label image)."""
    if mono.ndim != 2 or mono.dtype != np.uint8 or mono.size == 0:
        raise GroundingError(f"mono8 needs a non-empty (H, W) uint8 array, got {mono.shape} {mono.dtype}")
    return _to_image(mono, 'mono8', header)


def is_empty_image(msg: Image) -> bool:
    """True for a default-constructed Image (no pixels): the action goal's 'use the latest frame'."""
    return msg.width == 0 and msg.height == 0 and len(msg.data) == 0
