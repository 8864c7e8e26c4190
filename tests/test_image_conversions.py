"""sensor_msgs/Image <-> numpy conversions (flmm_ros.ros.image_conversions), built by hand byte by byte."""
import array

import numpy as np
import pytest

from sensor_msgs.msg import Image
from std_msgs.msg import Header

from flmm_ros.grounding.types import GroundingError
from flmm_ros.ros.image_conversions import (image_to_depth, image_to_rgb, is_empty_image,
                                            mono_to_image, rgb_to_image)

RNG = np.random.default_rng(7)


def make_image(pixels: np.ndarray, encoding: str, *, pad: int = 0, bigendian: bool = False) -> Image:
    """An Image whose rows are `pixels` rows (as raw bytes) followed by `pad` junk bytes."""
    height, width = pixels.shape[:2]
    if pixels.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder('>' if bigendian else '<'))
    raw = pixels.reshape(height, -1).view(np.uint8).reshape(height, -1)
    junk = np.full((height, pad), 0xAB, dtype=np.uint8)
    rows = np.concatenate([raw, junk], axis=1)
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian), step=rows.shape[1])
    msg.data = array.array('B', rows.tobytes())
    return msg


@pytest.fixture
def rgb():
    return RNG.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize('pad', [0, 3])
def test_rgb8_round_trip_and_padding(rgb, pad):
    out = image_to_rgb(make_image(rgb, 'rgb8', pad=pad))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('pad', [0, 2])
def test_bgr8_is_reordered(rgb, pad):
    out = image_to_rgb(make_image(rgb[:, :, ::-1].copy(), 'bgr8', pad=pad))
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding, order', [('rgba8', [0, 1, 2]), ('bgra8', [2, 1, 0])])
def test_four_channel_encodings_drop_alpha(rgb, encoding, order):
    alpha = RNG.integers(0, 256, size=(5, 7, 1), dtype=np.uint8)
    wire = np.concatenate([rgb[:, :, order], alpha], axis=2)
    out = image_to_rgb(make_image(wire, encoding, pad=4))
    np.testing.assert_array_equal(out, rgb)


def test_mono8_becomes_grey_rgb():
    grey = RNG.integers(0, 256, size=(4, 6), dtype=np.uint8)
    out = image_to_rgb(make_image(grey[:, :, None], 'mono8', pad=2))
    assert out.shape == (4, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], grey)


def test_result_is_writable_copy(rgb):
    msg = make_image(rgb, 'rgb8')
    out = image_to_rgb(msg)
    out[:] = 0  # must not write into the message's buffer
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


@pytest.mark.parametrize('bigendian', [False, True])
@pytest.mark.parametrize('pad', [0, 6])
def test_16uc1_depth_millimetres_to_metres(bigendian, pad):
    mm = np.array([[0, 1, 1000], [65535, 258, 4660]], dtype=np.uint16)
    out = image_to_depth(make_image(mm[:, :, None], '16UC1', pad=pad, bigendian=bigendian))
    assert out.dtype == np.float32 and out.shape == (2, 3)
    np.testing.assert_allclose(out, mm.astype(np.float64) / 1000.0, rtol=1e-6)
    assert out[0, 0] == 0.0  # no reading stays 0


def test_16uc1_endianness_flag_matters():
    """Bytes 0x01 0x02: little-endian 513 mm, big-endian 258 mm."""
    msg = Image(height=1, width=1, encoding='16UC1', step=2)
    msg.data = array.array('B', [1, 2])
    assert image_to_depth(msg)[0, 0] == pytest.approx(0.513)
    msg.is_bigendian = 1
    assert image_to_depth(msg)[0, 0] == pytest.approx(0.258)


@pytest.mark.parametrize('bigendian', [False, True])
def test_32fc1_depth_metres_keeps_invalid(bigendian):
    metres = np.array([[0.5, np.nan, 0.0], [2.25, 10.0, np.inf]], dtype=np.float32)
    out = image_to_depth(make_image(metres[:, :, None], '32FC1', pad=4, bigendian=bigendian))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(out), np.isnan(metres))
    finite = np.isfinite(metres)
    np.testing.assert_array_equal(out[finite], metres[finite])
    assert out[0, 2] == 0.0


@pytest.mark.parametrize('encoding', ['rgb16', '8UC3', 'yuv422', 'bayer_rggb8', ''])
def test_unsupported_colour_encoding(rgb, encoding):
    with pytest.raises(GroundingError, match='unsupported image encoding'):
        image_to_rgb(make_image(rgb, encoding))


def test_depth_encoding_is_not_a_colour_image():
    with pytest.raises(GroundingError, match="unsupported image encoding '16UC1'"):
        image_to_rgb(make_image(np.zeros((2, 2, 1), np.uint16), '16UC1'))


@pytest.mark.parametrize('encoding', ['rgb8', 'mono16', '16SC1', '64FC1'])
def test_unsupported_depth_encoding(encoding):
    with pytest.raises(GroundingError, match='unsupported depth encoding'):
        image_to_depth(make_image(np.zeros((2, 2, 1), np.uint16), encoding))


def test_zero_size_image():
    with pytest.raises(GroundingError, match='zero size'):
        image_to_rgb(Image(height=0, width=4, encoding='rgb8', step=12))
    with pytest.raises(GroundingError, match='zero size'):
        image_to_depth(Image(height=3, width=0, encoding='32FC1', step=0))


def test_wrong_data_length(rgb):
    msg = make_image(rgb, 'rgb8')
    msg.data = msg.data[:-1]
    with pytest.raises(GroundingError, match='expected step x height'):
        image_to_rgb(msg)
    msg = make_image(rgb, 'rgb8')
    msg.data.extend([0] * 5)
    with pytest.raises(GroundingError, match='expected step x height'):
        image_to_rgb(msg)


def test_step_smaller_than_row(rgb):
    msg = make_image(rgb, 'rgb8')
    msg.step = 7 * 3 - 1
    msg.data = array.array('B', bytes(msg.step * 5))
    with pytest.raises(GroundingError, match='smaller than one row'):
        image_to_rgb(msg)


def test_rgb_to_image_round_trip_keeps_header(rgb):
    header = Header(frame_id='camera_optical')
    header.stamp.sec, header.stamp.nanosec = 12, 345
    msg = rgb_to_image(rgb, header)
    assert (msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian) == ('rgb8', 5, 7, 21, 0)
    assert msg.header.frame_id == 'camera_optical' and msg.header.stamp.nanosec == 345
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


def test_mono_to_image_round_trip():
    mask = np.zeros((3, 4), np.uint8)
    mask[1, 2] = 255
    msg = mono_to_image(mask)
    assert (msg.encoding, msg.step) == ('mono8', 4)
    np.testing.assert_array_equal(np.frombuffer(msg.data, np.uint8).reshape(3, 4), mask)


@pytest.mark.parametrize('bad', [np.zeros((3, 4), np.uint8), np.zeros((3, 4, 3), np.float32),
                                 np.zeros((0, 4, 3), np.uint8), np.zeros((3, 4, 4), np.uint8)])
def test_rgb_to_image_rejects_bad_arrays(bad):
    with pytest.raises(GroundingError, match='rgb8 needs'):
        rgb_to_image(bad)


@pytest.mark.parametrize('bad', [np.zeros((3, 4, 1), np.uint8), np.zeros((3, 4), np.uint16), np.zeros((0, 0), np.uint8)])
def test_mono_to_image_rejects_bad_arrays(bad):
    with pytest.raises(GroundingError, match='mono8 needs'):
        mono_to_image(bad)


def test_is_empty_image(rgb):
    assert is_empty_image(Image())
    assert not is_empty_image(make_image(rgb, 'rgb8'))
