"""Generated tracking sequences: determinism, exact per-frame masks, and each scenario's motion happens."""
import numpy as np
import pytest
from flmm_ros.tabletop import language
from flmm_ros.tabletop.scenes import COLOUR_RGB, MIN_VISIBLE
from flmm_ros.tabletop.sequences import LENGTHS, SCENARIOS, generate_sequence


def _all_frames(seq):
    return list(seq.frames())


def test_same_seed_same_sequence_and_different_seeds_differ():
    a, b = generate_sequence(3, (96, 128), "pan"), generate_sequence(3, (96, 128), "pan")
    assert a.phrases == b.phrases and a.length == b.length
    for t in (0, a.length // 2, a.length - 1):
        fa, fb = a.frame(t), b.frame(t)
        assert np.array_equal(fa.image, fb.image) and np.array_equal(fa.masks, fb.masks)
    assert not np.array_equal(a.frame(0).image, generate_sequence(4, (96, 128), "pan").frame(0).image)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_frames_have_exact_disjoint_masks_of_the_right_shapes(scenario):
    for seed in range(3):
        seq = generate_sequence(seed, (96, 128), scenario)
        lo, hi = LENGTHS[scenario]
        assert lo <= seq.length <= hi and seq.scenario == scenario
        for f in _all_frames(seq)[::7]:
            assert f.image.shape == (96, 128, 3) and f.image.dtype == np.uint8
            assert f.masks.shape == (len(seq.objects), 96, 128) and f.masks.dtype == bool
            assert f.masks.sum(0).max() <= 1, "masks overlap"
            visible = f.masks.reshape(len(seq.objects), -1).sum(1)
            assert np.all(visible <= f.in_view_areas) and np.all(f.in_view_areas <= f.silhouette_areas)


def _colour_votes(pixels: np.ndarray) -> np.ndarray:
    names = list(COLOUR_RGB)
    refs = np.array([np.array(COLOUR_RGB[c]) / max(COLOUR_RGB[c]) for c in names])
    norm = pixels / np.maximum(pixels.max(1, keepdims=True), 1e-6)
    return np.linalg.norm(norm[:, None, :] - refs[None], axis=2).argmin(1)


def test_mask_pixels_show_their_object_on_every_frame():
    """A mask is the object's pixels in *this* frame: they show its colour (not the background, not a neighbour)."""
    names = list(COLOUR_RGB)
    checked, wrong = 0, []
    for scenario in SCENARIOS:
        seq = generate_sequence(11, (120, 160), scenario)
        for f in _all_frames(seq)[::5]:
            for k, obj in enumerate(seq.objects):
                if f.masks[k].sum() < 30:
                    continue
                votes = np.bincount(_colour_votes(f.image[f.masks[k]].astype(float)), minlength=len(names))
                checked += 1
                if names[votes.argmax()] != obj.colour:
                    wrong.append((scenario, f.index, obj.kind, obj.colour, names[votes.argmax()]))
    assert checked > 100 and len(wrong) <= 0.02 * checked, wrong


def test_targets_are_named_uniquely_and_fully_in_view_at_the_start():
    for seed in range(12):
        seq = generate_sequence(seed, (96, 128))
        first = seq.frame(0)
        assert 0 in seq.targets and len(seq.targets) == len(seq.phrases)
        for k, phrase in zip(seq.targets, seq.phrases):
            assert not language.is_positional(phrase) and " next to " not in phrase
            # the phrase holds for exactly one object of the whole world, not only of the first view
            words = phrase.split()[1:]
            named = [o for o in seq.objects if words[-1] in (o.kind, "object")
                     and (len(words) == 1 or words[0] == o.colour)]
            assert named == [seq.objects[k]], (seed, phrase)
            assert first.visible_fraction(k) >= MIN_VISIBLE and first.in_view_areas[k] == first.silhouette_areas[k]


def test_pan_and_zoom_move_the_camera_and_shift_moves_objects():
    pan = generate_sequence(1, (96, 128), "pan")
    assert np.ptp(pan.camera[:, 0]) > 0.15 * 128 and np.all(pan.camera[:, 2] == 1)
    zoom = generate_sequence(1, (96, 128), "zoom")
    assert np.ptp(zoom.camera[:, 2]) > 0.05
    shift = generate_sequence(1, (96, 128), "shift")
    assert max(np.ptp(o.x) for o in shift.objects) > 0.05 * 128


def test_occlusion_hides_the_target_behind_a_nearer_object_then_shows_it_again():
    for seed in range(4):
        seq = generate_sequence(seed, (96, 128), "occlusion")
        frames = _all_frames(seq)
        visible = np.array([f.visible_fraction(0) for f in frames])
        in_view = np.array([f.in_view_areas[0] for f in frames])
        hidden = np.nonzero(visible == 0)[0]
        assert hidden.size and np.all(in_view[hidden] > 0), "hidden by an object, not by leaving the view"
        assert visible[0] >= MIN_VISIBLE and visible[hidden[-1]:].max() >= MIN_VISIBLE


def test_reentry_takes_the_target_out_of_view_and_back():
    for seed in range(4):
        seq = generate_sequence(seed, (96, 128), "reentry")
        in_view = np.array([f.in_view_areas[0] for f in seq.frames()])
        out = np.nonzero(in_view == 0)[0]
        assert out.size, "the target never leaves the view"
        assert in_view[0] > 0 and in_view[out[-1]:].max() > 0.5 * in_view[0]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown scenario"):
        generate_sequence(0, scenario="spin")
    with pytest.raises(ValueError, match="at least 64x64"):
        generate_sequence(0, (32, 32))
    with pytest.raises(IndexError):
        generate_sequence(0, (96, 128), "pan", length=10).frame(10)
