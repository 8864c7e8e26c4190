"""Overlay and label image drawn from grounded objects."""
import numpy as np
import pytest

from flmm_ros.grounding.types import GroundedObject, GroundingError
from flmm_ros.overlay import PALETTE, draw_overlay, label_image, object_colour

HEIGHT, WIDTH = 120, 160


def rectangle_object(phrase, x0, y0, x1, y1, score=0.9):
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 255
    return GroundedObject(phrase=phrase, mask=mask, box=(x0, y0, x1, y1), score=score)


@pytest.fixture
def scene():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    objects = [rectangle_object("red mug", 20, 60, 60, 100), rectangle_object("bowl", 100, 70, 140, 110, 0.5)]
    return image, objects


def expected_blend(pixels, colour, alpha):
    return np.round((1 - alpha) * pixels.astype(np.float32) + alpha * np.array(colour, np.float32)).astype(np.uint8)


def test_mask_interiors_are_blended_in_their_own_colour(scene):
    image, objects = scene
    out = draw_overlay(image, objects, alpha=0.45)
    for index, (x0, y0, x1, y1) in enumerate(o.box for o in objects):
        inner = (slice(y0 + 4, y1 - 4), slice(x0 + 4, x1 - 4))  # away from the outline and box lines
        np.testing.assert_array_equal(out[inner], expected_blend(image[inner], object_colour(index), 0.45))
        # Box line on the left edge is drawn in the object's colour.
        np.testing.assert_array_equal(out[(y0 + y1) // 2, x0], object_colour(index))
    assert object_colour(0) != object_colour(1)


def test_pixels_away_from_objects_and_labels_are_untouched(scene):
    image, objects = scene
    out = draw_overlay(image, objects)
    may_change = np.zeros((HEIGHT, WIDTH), dtype=bool)
    for x0, y0, x1, y1 in (o.box for o in objects):
        may_change[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True
        may_change[:y0 + 2, x0 - 20:] = True  # label tab on the box top, shifted left near the image edge
    assert may_change.mean() < 0.8  # the check below covers a real part of the image
    np.testing.assert_array_equal(out[~may_change], image[~may_change])
    # The label was drawn: pixels just above the first box changed.
    assert np.any(out[45:59, 20:60] != image[45:59, 20:60])


def test_input_is_not_modified_and_output_is_deterministic(scene):
    image, objects = scene
    before = image.copy()
    masks_before = [o.mask.copy() for o in objects]
    first = draw_overlay(image, objects)
    second = draw_overlay(image, objects)
    np.testing.assert_array_equal(image, before)
    for obj, mask in zip(objects, masks_before):
        np.testing.assert_array_equal(obj.mask, mask)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, image)


def test_empty_object_list_returns_an_unchanged_copy(scene):
    image, _ = scene
    out = draw_overlay(image, [])
    np.testing.assert_array_equal(out, image)
    assert out is not image
    out[0, 0] = 255 - out[0, 0]
    assert not np.array_equal(out[0, 0], image[0, 0])


def test_empty_mask_with_zero_box_draws_nothing(scene):
    image, _ = scene
    empty = GroundedObject("ghost", np.zeros((HEIGHT, WIDTH), np.uint8), (0, 0, 0, 0), 0.0)
    np.testing.assert_array_equal(draw_overlay(image, [empty]), image)


def test_palette_cycles_deterministically():
    assert object_colour(0) == PALETTE[0]
    assert object_colour(len(PALETTE) + 3) == PALETTE[3]
    assert len(set(PALETTE)) == len(PALETTE)


def test_bad_inputs_give_clear_errors(scene):
    image, objects = scene
    wrong_size = GroundedObject("cup", np.zeros((10, 10), np.uint8), (0, 0, 5, 5), 0.3)
    with pytest.raises(GroundingError, match="cup.*shape"):
        draw_overlay(image, [wrong_size])
    with pytest.raises(GroundingError, match="uint8"):
        draw_overlay(image.astype(np.float32), objects)
    with pytest.raises(GroundingError, match="alpha"):
        draw_overlay(image, objects, alpha=1.5)
    with pytest.raises(GroundingError, match="shape"):
        label_image([wrong_size], image.shape)


def test_label_image_values_and_draw_order(scene):
    image, objects = scene
    overlapping = rectangle_object("cloth", 40, 80, 120, 90)  # drawn last: covers parts of both
    overlapping.mask = overlapping.mask > 0  # bool masks work too
    labels = label_image(objects + [overlapping], image.shape)
    assert labels.shape == (HEIGHT, WIDTH) and labels.dtype == np.uint8
    assert labels[0, 0] == 0
    assert labels[65, 25] == 1 and labels[75, 135] == 2
    assert labels[85, 45] == 3 and labels[85, 110] == 3  # on top of object 1 and object 2
    expected = np.zeros((HEIGHT, WIDTH), np.uint8)
    expected[60:100, 20:60] = 1
    expected[70:110, 100:140] = 2
    expected[80:90, 40:120] = 3
    np.testing.assert_array_equal(labels, expected)
    assert not label_image([], (HEIGHT, WIDTH)).any()


# ---- the caption strip (grounded conversation) -------------------------------------------------------------
from flmm_ros.overlay import (  # noqa: E402
    CAPTION_BACKGROUND_RGB, CAPTION_TEXT_RGB, caption_layout, caption_strip, draw_grounded_answer)

ANSWER = "the red mug is next to the bowl, on the left."


def spanned_objects():
    red = rectangle_object("the red mug", 20, 60, 60, 100)
    bowl = rectangle_object("the bowl", 100, 70, 140, 110)
    red.answer_span = (0, len("the red mug"))
    bowl.answer_span = (ANSWER.index("the bowl"), ANSWER.index("the bowl") + len("the bowl"))
    return [red, bowl]


def test_the_phrases_words_take_their_objects_colours_and_the_rest_is_black():
    placed = caption_layout(ANSWER, spanned_objects(), 600)
    colour_of = {text: rgb for text, rgb, _, _ in placed}
    assert [text for text, *_ in placed] == ["the", "red", "mug", "is", "next", "to", "the", "bowl", ",", "on",
                                             "the", "left."]
    assert [rgb for _, rgb, _, _ in placed[:3]] == [object_colour(0)] * 3
    assert placed[6][1] == placed[7][1] == object_colour(1)        # "the bowl" ...
    assert colour_of[","] == colour_of["is"] == colour_of["left."] == CAPTION_TEXT_RGB   # ... its comma is not
    assert placed[8][2] > placed[7][2] and placed[8][3] == placed[7][3]   # the comma right after "bowl"


def test_the_strip_draws_each_word_in_its_colour_and_wraps_to_the_width():
    objects = spanned_objects()
    strip = caption_strip(ANSWER, objects, 600)
    assert strip.dtype == np.uint8 and strip.shape[1] == 600
    for text, rgb, x, y in caption_layout(ANSWER, objects, 600):
        ink = strip[y - 10:y + 2, x:x + 6 * len(text)].reshape(-1, 3)
        ink = ink[(ink != CAPTION_BACKGROUND_RGB).any(axis=1)]
        closest = min((object_colour(0), object_colour(1), CAPTION_TEXT_RGB),
                      key=lambda c: np.abs(ink.astype(int) - c).sum(axis=1).min())
        assert closest == rgb, text
    narrow = caption_strip(ANSWER, objects, 120)
    assert narrow.shape[0] > strip.shape[0]                         # more lines
    lines = {y for *_, y in caption_layout(ANSWER, objects, 120)}
    assert len(lines) >= 3 and all(x + 1 < 120 for _, _, x, _ in caption_layout(ANSWER, objects, 120))


def test_grounded_answer_is_the_overlay_over_its_caption(scene):
    image, _ = scene
    objects = spanned_objects()
    out = draw_grounded_answer(image, ANSWER, objects)
    np.testing.assert_array_equal(out[:HEIGHT], draw_overlay(image, objects))
    np.testing.assert_array_equal(out[HEIGHT:], caption_strip(ANSWER, objects, WIDTH))
    plain = caption_strip(ANSWER, [rectangle_object("x", 0, 0, 4, 4)], 600)   # no spans: all black text
    ink = plain[(plain != CAPTION_BACKGROUND_RGB).any(axis=2)]
    assert ink.min() < 50 and (ink[:, 0] == ink[:, 1]).all() and (ink[:, 1] == ink[:, 2]).all()
