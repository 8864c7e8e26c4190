"""ObjectTracker on the shipped embedded model: follows grounded objects without the LMM, keeps ids, loses
and finds them again by its lost rule; TrackerConfig validation; the tracker's image cues."""
import threading
from dataclasses import fields, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flmm_ros.grounding import track_cues as cues
from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.tracking import LOST_REASONS, ObjectTracker, TrackerConfig
from flmm_ros.grounding.types import GroundingError
from flmm_ros.tabletop.scenes import generate_scene
from flmm_ros.tabletop.sequences import generate_sequence

BUNDLE = Path(__file__).resolve().parents[1] / "ros_ws/src/flmm_ros/models/tabletop_tiny"
DEMO_SEED = 2000016            # the README demo scene: white mug, purple box, red mug


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    cache = tmp_path_factory.mktemp("engines")
    return GroundingPipeline.from_config(PipelineConfig(model=str(BUNDLE), answer=False, engine_dir=str(cache)))


@pytest.fixture(scope="module")
def demo(pipe):
    scene = generate_scene(DEMO_SEED, (256, 256))
    objects = pipe.ground(pipe.encode(scene.image), ["the red mug"])
    return scene, objects


def _iou(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return (a & b).sum() / max(1, (a | b).sum())


# ---- grounding keeps what tracking needs -------------------------------------------------------------
def test_grounded_objects_carry_their_phrase_prompt_tokens(pipe, demo):
    _, objects = demo
    tokens = objects[0].prompt_tokens
    assert tokens.dtype == np.float32 and tokens.ndim == 2
    assert tokens.shape[1] == pipe.head.sam.prompt_encoder.embed_dim and tokens.shape[0] >= 1


def test_without_the_refiner_there_are_no_tokens_and_tracking_says_why(pipe, demo):
    coarse_only = GroundingPipeline(pipe.lmm, pipe.head, None, replace(pipe.config, refine=False))
    scene, _ = demo
    obj = coarse_only.ground(coarse_only.encode(scene.image), ["the red mug"])[0]
    assert obj.prompt_tokens is None
    with pytest.raises(GroundingError, match="no prompt tokens"):
        ObjectTracker(pipe).start([obj])


# ---- configuration ------------------------------------------------------------------------------------
def test_every_setting_has_a_description():
    descriptions = TrackerConfig.descriptions()
    assert set(descriptions) == {f.name for f in fields(TrackerConfig)}
    assert all(len(text) > 20 for text in descriptions.values())


@pytest.mark.parametrize("values, message", [
    ({"regrounding": "sometimes"}, "regrounding"), ({"backend": "cuda"}, "backend"),
    ({"min_confidence": 1.5}, "min_confidence"), ({"max_area_change": 0.5}, "max_area_change"),
    ({"box_margin": 0.8, "search_margin": 0.5}, "margins"), ({"colour_weight": -1.0}, "colour_weight"),
    ({"colour_weight": float("nan")}, "colour_weight"), ({"reground_every": 0}, "reground_every"),
    ({"no_such_setting": 1}, "unknown tracker settings")])
def test_bad_settings_are_refused_with_the_reason(values, message):
    with pytest.raises(GroundingError, match=message):
        TrackerConfig.from_dict(values)


def test_auto_backend_on_a_cpu_is_onnxruntime_with_the_set_threads(pipe):
    tracker = ObjectTracker(pipe, TrackerConfig(threads=1))
    assert tracker.backend.name == "onnxruntime"              # whatever the pipeline's backend
    for session in (tracker.backend.encoder, tracker.backend.decoder):
        assert session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("dtype, precision", [("auto", "fp32"), ("float32", "fp32"), ("bfloat16", "fp16"),
                                              ("float16", "fp16")])
def test_sam_precision_follows_the_pipelines_dtype(dtype, precision):
    """dtype auto runs the pipeline's SAM in fp32, and the tracker's on a CPU (it once chose an fp16 encoder there)."""
    cfg = PipelineConfig(model=str(BUNDLE), dtype=dtype)
    assert cfg.sam_precision == precision


def test_on_a_cpu_the_trackers_sam_encoder_is_int8_unless_turned_off(pipe):
    assert pipe.config.dtype == "auto" and pipe.config.sam_precision == "fp32"
    assert ObjectTracker(pipe, TrackerConfig(threads=1)).backend.models.precision == "int8"
    assert ObjectTracker(pipe, TrackerConfig(int8_encoder=False)).backend.models.precision == "fp32"
    assert ObjectTracker(pipe, TrackerConfig(backend="torch")).backend.precision == "fp32"     # ONNX Runtime's only


# ---- following objects ----------------------------------------------------------------------------------
def test_a_still_object_keeps_its_mask_and_id(pipe, demo):
    """The same frame again and again: the first update may sharpen the grounded mask (the colour model), then the
    mask holds still, on the same object, under the same id."""
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    started = tracker.start(objects, image=scene.image)
    assert [t.track_id for t in started] == [1] and started[0].state == "tracking"
    previous = objects[0].mask
    for age in range(1, 6):
        obj = tracker.update(scene.image).objects[0]
        assert obj.track_id == 1 and obj.state == "tracking" and obj.age == age
        assert _iou(obj.mask, objects[0].mask) >= 0.8 and _iou(obj.mask, previous) >= (0.8 if age == 1 else 0.95)
        assert obj.box != (0, 0, 0, 0) and 0 < obj.confidence <= 1 and obj.appearance > 0.9
        previous = obj.mask


def test_it_follows_a_moving_object_where_the_first_mask_does_not():
    """The camera pans: the tracked mask stays on the object; frame 0's mask (the naive way) falls off it."""
    seq = generate_sequence(5, (256, 256), "pan", length=40)
    target = seq.targets[0]
    pipe = _shared_pipe()
    grounded = pipe.ground(pipe.encode(seq.frame(0).image), [seq.phrases[0]])
    first = seq.frame(0)
    grounded = [replace(grounded[0], mask=first.masks[target].astype(np.uint8) * 255)]   # a right start
    tracker = ObjectTracker(pipe)
    tracker.start(grounded, image=first.image)
    tracked, kept = [], []
    for f in list(seq.frames())[1:]:
        obj = tracker.update(f.image).objects[0]
        assert obj.state == "tracking" and obj.track_id == 1
        tracked.append(_iou(obj.mask, f.masks[target]))
        kept.append(_iou(first.masks[target], f.masks[target]))
    assert np.mean(tracked) >= 0.8 and min(tracked[-10:]) >= 0.7
    assert np.mean(kept[-10:]) < 0.5


_PIPE = {}


def _shared_pipe():
    if "pipe" not in _PIPE:
        _PIPE["pipe"] = GroundingPipeline.from_config(PipelineConfig(model=str(BUNDLE), answer=False))
    return _PIPE["pipe"]


def test_lost_while_out_of_view_then_found_again_under_the_same_id():
    seq = generate_sequence(4, (256, 256), "reentry")
    pipe = _shared_pipe()
    first = seq.frame(0)
    grounded = pipe.ground(pipe.encode(first.image), [seq.phrases[0]])
    grounded = [replace(grounded[0], mask=first.masks[0].astype(np.uint8) * 255)]
    tracker = ObjectTracker(pipe, TrackerConfig(regrounding="auto", reground_every=3))
    tracker.start(grounded, image=first.image)
    states = []
    for f in list(seq.frames())[1:]:
        obj = tracker.update(f.image).objects[0]
        assert obj.track_id == 1
        out_of_view = f.in_view_areas[0] == 0
        if obj.state == "lost":
            assert obj.lost_reason in LOST_REASONS and not obj.mask.any() and obj.box == (0, 0, 0, 0)
        states.append((out_of_view, obj.state, _iou(obj.mask, f.masks[0])))
    assert all(state == "lost" for out, state, _ in states if out), "a mask while the object is out of view"
    back = [i for i, (out, _, _) in enumerate(states) if out][-1] + 1
    recovered = [iou for _, state, iou in states[back:] if state == "tracking"]
    assert recovered and np.mean(recovered) >= 0.6
    assert states[-1][1] == "tracking"


@pytest.fixture(scope="module")
def jump(pipe):
    """A scene, its red can grounded, and the scene moved sideways by twice the can's width: as if the camera
    jumped, too far for the tracker to follow (np.roll: what leaves one side comes in on the other)."""
    scene = generate_scene(2000001, (256, 256))
    objects = pipe.ground(pipe.encode(scene.image), ["the red can"])
    x0, _, x1, _ = objects[0].box
    dx = 2 * (x1 - x0) + 20
    return scene.image, objects, np.roll(scene.image, -dx, axis=1), np.roll(objects[0].mask, -dx, axis=1)


@pytest.mark.parametrize("regrounding", ["auto", "off"])
def test_after_a_jump_only_regrounding_finds_the_object_and_it_keeps_its_id(pipe, jump, regrounding):
    image, objects, jumped, moved_mask = jump
    tracker = ObjectTracker(pipe, TrackerConfig(regrounding=regrounding, reground_every=1, recover=False))
    tracker.start(objects, image=image)
    update = tracker.update(jumped)
    obj = update.objects[0]
    if regrounding == "off":
        assert obj.state == "lost" and "reground" not in update.timings
        return
    assert obj.state == "tracking" and obj.regrounded and obj.track_id == 1 and "reground" in update.timings
    assert _iou(obj.mask, moved_mask) >= 0.7
    assert not tracker.update(jumped).objects[0].regrounded       # then followed by SAM alone


def test_a_regrounding_gives_way_when_the_lmm_is_wanted_and_comes_again_on_the_next_frame(pipe, jump):
    """yield_to() True (the node: an instruction came) while a re-grounding runs stops it at its next stage; the object
    stays lost and the re-grounding is tried again on the very next frame, even with reground_every 5."""
    image, objects, jumped, moved_mask = jump
    state = {"instruction": True, "regrounding": False, "asked": 0}

    def instruction_waits():
        state["asked"] += state["regrounding"]
        return state["instruction"] and state["regrounding"]   # it comes once the re-grounding has begun

    tracker = ObjectTracker(pipe, TrackerConfig(reground_every=5, recover=False), yield_to=instruction_waits)
    reground = tracker._reground

    def regrounding(*args):
        state["regrounding"] = True
        try:
            return reground(*args)
        finally:
            state["regrounding"] = False

    tracker._reground = regrounding
    tracker.start(objects, image=image)
    first = tracker.update(jumped).objects[0]
    assert first.state == "lost" and state["asked"] == 1     # asked before the first stage, gave way at once
    state["instruction"] = False
    again = tracker.update(jumped).objects[0]
    assert again.state == "tracking" and again.regrounded and _iou(again.mask, moved_mask) >= 0.7
    assert state["asked"] > 2                                 # asked at each stage of the re-grounding


def test_public_reground_finds_lost_objects(pipe, jump):
    image, objects, jumped, _ = jump
    tracker = ObjectTracker(pipe, TrackerConfig(regrounding="off", recover=False))
    tracker.start(objects, image=image)
    assert tracker.update(jumped).objects[0].state == "lost"
    assert tracker.reground(jumped) == [1] and tracker.tracks[0].state == "tracking"


def test_two_tracks_on_one_object_leave_one_tracking(pipe, demo):
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    tracker.start([objects[0], objects[0]], image=scene.image)
    a, b = tracker.update(scene.image).objects
    assert {a.track_id, b.track_id} == {1, 2}
    assert sorted([a.state, b.state]) == ["lost", "tracking"]
    assert (a if a.state == "lost" else b).lost_reason == "duplicate"


def test_a_contested_object_stays_with_the_track_that_changed_least(pipe, demo):
    """Track 1 starts on a sloppy half of the red mug, track 2 on all of it; both masks become the whole mug. The
    mug stays with track 2, whose mask did not change (track 1's grew to twice its size: it drifted there)."""
    scene, objects = demo
    mug = objects[0].mask > 0
    cols = np.flatnonzero(mug.any(0))
    half = mug & (np.arange(mug.shape[1]) < (cols[0] + cols[-1]) // 2)
    tracker = ObjectTracker(pipe)
    tracker.start([replace(objects[0], mask=half.astype(np.uint8) * 255), objects[0]], image=scene.image)
    drifted, steady = tracker.update(scene.image).objects
    assert steady.state == "tracking" and _iou(steady.mask, objects[0].mask) > 0.8
    assert drifted.state == "lost" and drifted.lost_reason == "duplicate"


def test_new_thresholds_apply_from_the_next_frame_but_the_runtime_is_fixed(pipe, demo):
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    tracker.start(objects, image=scene.image)
    assert tracker.update(scene.image).objects[0].state == "tracking"
    tracker.configure({"min_confidence": 0.999})          # no mask is that sure of itself
    obj = tracker.update(scene.image).objects[0]
    assert obj.state == "lost" and obj.lost_reason == "low_confidence" and obj.track_id == 1
    with pytest.raises(GroundingError, match="threads cannot change"):
        tracker.configure(TrackerConfig(threads=2))
    with pytest.raises(GroundingError, match="int8_encoder cannot change"):
        tracker.configure({"int8_encoder": False})


def test_ids_are_never_reused_and_stop_removes_tracks(pipe, demo):
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    assert [t.track_id for t in tracker.start(objects, image=scene.image)] == [1]
    assert [t.track_id for t in tracker.start(objects + objects, image=scene.image, replace=False)] == [2, 3]
    assert [t.track_id for t in tracker.start(objects, image=scene.image)] == [4]
    tracker.stop([4])
    assert tracker.tracks == [] and tracker.update(scene.image).objects == []


def test_a_frame_encoding_saves_the_sam_encoder(pipe, demo, monkeypatch):
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    tracker.start(objects, image=scene.image)
    frame = pipe.encode(scene.image)
    monkeypatch.setattr(tracker.refiner, "encode", lambda image: pytest.fail("encoded again"))
    assert tracker.update(scene.image, frame=frame).objects[0].state == "tracking"


def test_bad_input_gets_a_plain_error(pipe, demo):
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    with pytest.raises(GroundingError, match="mask of 'the red mug' is"):
        tracker.start(objects, image=scene.image[:100])
    tracker.start(objects, image=scene.image)
    with pytest.raises(GroundingError, match="image size changed"):
        tracker.update(np.zeros((128, 128, 3), np.uint8))
    with pytest.raises(GroundingError, match="RGB uint8"):
        tracker.update(scene.image.astype(np.float32))


def test_updates_and_restarts_from_two_threads(pipe, demo):
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    tracker.start(objects, image=scene.image)
    errors = []

    def camera():
        try:
            for _ in range(15):
                tracker.update(scene.image)
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=camera)
    thread.start()
    for _ in range(10):
        tracker.start(objects, image=scene.image)
    thread.join()
    assert not errors and [t.state for t in tracker.tracks] == ["tracking"]


def test_start_and_stop_never_wait_for_the_update_in_progress(pipe, demo):
    """An instruction that starts tracking must not wait for the frame being tracked: with an update held inside
    its decoder pass, start() and stop() return, and that update then leaves out the tracks they replaced."""
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    old = tracker.start(objects, image=scene.image)[0].track_id
    in_decoder, release = threading.Event(), threading.Event()
    decode = tracker.backend.decode

    def held_decode(*args):
        in_decoder.set()
        assert release.wait(60), "the test did not release the update"
        return decode(*args)

    tracker.backend.decode = held_decode
    result = {}
    updating = threading.Thread(target=lambda: result.setdefault("update", tracker.update(scene.image)))
    updating.start()
    try:
        assert in_decoder.wait(60)
        tracker.backend.decode = decode                      # the new tracks' own work must not be held
        _returns_while_held(lambda: result.setdefault("new", tracker.start(objects, image=scene.image)))
        assert [t.track_id for t in result["new"]] == [old + 1] and [t.track_id for t in tracker.tracks] == [old + 1]
    finally:
        release.set()
        updating.join(60)
    assert result["update"].objects == []                    # the replaced track is not reported as current
    assert [o.track_id for o in tracker.update(scene.image).objects] == [old + 1]
    follower = threading.Thread(target=lambda: tracker.update(scene.image))
    tracker.backend.decode = held_decode
    in_decoder.clear()
    release.clear()
    follower.start()
    try:
        assert in_decoder.wait(60)
        _returns_while_held(tracker.stop)
        assert tracker.tracks == []
    finally:
        release.set()
        follower.join(60)
    tracker.backend.decode = decode


def _track_state(tracker):
    return [(t.track_id, t.state, t.age, t.frames_lost, t.mask.tobytes()) for t in tracker.tracks]


@pytest.mark.parametrize("gives_way_from", [1, 2])
def test_an_update_gives_way_while_an_instruction_waits_before_any_track_changes(pipe, demo, gives_way_from):
    """yield_to() True before the SAM encoder pass (1st question) or right after it (2nd): the update returns
    `interrupted`, no objects, no track changed and the frame not counted; the next frame is tracked as usual."""
    scene, objects = demo
    asked = []
    tracker = ObjectTracker(pipe, yield_to=lambda: asked.append(1) or len(asked) >= gives_way_from)
    tracker.start(objects, image=scene.image)
    before = _track_state(tracker)
    update = tracker.update(scene.image)
    assert update.interrupted and update.objects == [] and update.frame_index == 0
    assert ("sam_encoder" in update.timings) == (gives_way_from == 2) and len(asked) == gives_way_from
    assert _track_state(tracker) == before
    tracker.yield_to = None
    after = tracker.update(scene.image)
    assert not after.interrupted and after.frame_index == 1 and after.objects[0].state == "tracking"


def _interrupted_in_encoder(tracker, call):
    """Runs `call` on another thread, holds its ONNX Runtime encoder pass, calls `tracker.interrupt()` meanwhile,
    then lets the pass go on; returns what `call` returned and what ONNX Runtime raised."""
    run, in_encoder, release, errors = tracker.backend._run, threading.Event(), threading.Event(), []

    def held_run(session, feeds, outputs, options=None):
        if session is tracker.backend.encoder and not release.is_set():
            in_encoder.set()
            assert release.wait(60), "the test did not release the encoder pass"
        try:
            return run(session, feeds, outputs, options)
        except Exception as error:
            errors.append(error)
            raise

    tracker.backend._run = held_run
    result = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()
    try:
        assert in_encoder.wait(60)
        tracker.interrupt()
    finally:
        release.set()
        thread.join(60)
        tracker.backend._run = run
    return result[0], errors


def test_interrupt_ends_the_encoder_pass_in_progress_with_no_track_changed(pipe, demo):
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    assert tracker.backend.name == "onnxruntime"
    tracker.start(objects, image=scene.image)
    before = _track_state(tracker)
    update, errors = _interrupted_in_encoder(tracker, lambda: tracker.update(scene.image))
    assert len(errors) == 1 and "terminate" in str(errors[0])     # ONNX Runtime ended the pass itself
    assert update.interrupted and update.objects == [] and _track_state(tracker) == before
    after = tracker.update(scene.image)                             # the interrupt was for that update only
    assert not after.interrupted and after.objects[0].state == "tracking"


def test_interrupt_never_ends_an_encoder_pass_outside_an_update(pipe, demo):
    """start() encodes its image on the caller's thread (no frame encoding given): an interrupt meant for the
    tracking thread must not make that instruction fail."""
    scene, objects = demo
    tracker = ObjectTracker(pipe)
    tracks, errors = _interrupted_in_encoder(tracker, lambda: tracker.start(objects, image=scene.image))
    assert errors == [] and [t.state for t in tracks] == ["tracking"]


def _returns_while_held(call):
    thread = threading.Thread(target=call)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "it waited for the update in progress"


# ---- the image cues ---------------------------------------------------------------------------------------
def test_estimate_shift_finds_a_known_shift_to_a_pixel():
    rng = np.random.default_rng(0)
    image = np.full((120, 160, 3), 90, np.uint8)
    texture = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    image[40:70, 50:90] = texture
    mask = np.zeros((120, 160), bool)
    mask[40:70, 50:90] = True
    moved = np.full_like(image, 140)                      # a changed background must not matter
    moved[47:77, 44:84] = texture                          # dx = -6, dy = +7
    dx, dy = cues.estimate_shift(image, moved, mask, (50, 40, 90, 70))
    assert abs(dx + 6) <= 1 and abs(dy - 7) <= 1


def test_mask_bounds_span_every_pixel_of_the_mask():
    rng = np.random.default_rng(0)
    masks = [rng.random((31, 47)) > t for t in (0.5, 0.99, 0.999)] + [np.zeros((5, 5), bool), np.eye(6, dtype=bool)]
    for mask in masks:
        ys, xs = np.nonzero(mask)
        expected = None if ys.size == 0 else (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
        assert cues.mask_bounds(mask) == expected


def test_clean_mask_drops_far_blobs_and_fills_holes():
    previous = np.zeros((50, 50), bool)
    previous[10:30, 10:30] = True
    new = np.zeros_like(previous)
    new[12:32, 12:32] = True
    new[20, 20] = False                                     # a hole
    new[40:45, 40:45] = True                                # a blob on something else
    cleaned = cues.clean_mask(new, previous)
    assert cleaned[20, 20] and not cleaned[40:45, 40:45].any() and cleaned[12:32, 12:32].all()


def test_largest_component_keeps_the_main_part():
    mask = np.zeros((30, 30), bool)
    mask[2:12, 2:12] = True
    mask[20:23, 20:23] = True
    assert (cues.largest_component(mask) == (np.arange(30)[:, None] < 12) & (np.arange(30)[:, None] >= 2)
            & (np.arange(30) < 12) & (np.arange(30) >= 2)).all()


def test_colour_similarity_tells_colours_apart():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = (200, 30, 30)
    image[:, 20:] = (30, 30, 200)
    left, right = np.zeros((20, 40), bool), np.zeros((20, 40), bool)
    left[:, :20], right[:, 20:] = True, True
    red, blue = cues.colour_histogram(image, left), cues.colour_histogram(image, right)
    assert cues.histogram_similarity(red, red) == pytest.approx(1.0)
    assert cues.histogram_similarity(red, blue) == pytest.approx(0.0)
    assert cues.colour_histogram(image, np.zeros((20, 40), bool)) is None


def test_colour_log_ratio_favours_the_objects_colours_and_ignores_shared_ones():
    image = np.full((40, 60, 3), 120, np.uint8)           # grey table
    image[10:30, 10:30] = (200, 30, 30)                   # the red object ...
    image[10:30, 20:30] = 120                             # ... half grey, a colour its surroundings share
    image[10:30, 32:50] = (30, 30, 200)                   # a blue neighbour touching it
    mask = np.zeros((40, 60), bool)
    mask[10:30, 10:30] = True
    ratio = cues.colour_log_ratio(image, mask, image, limit=3.0)
    assert ratio.shape == (40, 60) and ratio.dtype == np.float32
    assert (ratio[15, 12] == 3.0) and (ratio[15, 40] == -3.0)   # red: the object; blue: not
    # grey is half the object and most of its surroundings: log(0.5 / 0.8), nothing like a colour of one side
    assert abs(ratio[15, 21]) < 0.6 and ratio[2, 2] == ratio[15, 21]
    assert cues.colour_log_ratio(image, np.zeros((40, 60), bool), image) is None   # nothing to learn from
    assert cues.colour_log_ratio(image, np.ones((40, 60), bool), image) is None
    # A window over MODEL_PIXELS is read every n-th pixel, the ratio resized back: same shape, same answer inside
    big, big_mask = (np.kron(a, np.ones((15, 15) + a.shape[2:], a.dtype)) for a in (image, mask))   # 600 x 900
    assert big.shape[0] * big.shape[1] > cues.MODEL_PIXELS
    ratio = cues.colour_log_ratio(big, big_mask, big, limit=3.0)
    assert ratio.shape == (600, 900) and ratio[15 * 15, 15 * 12] == 3.0 and ratio[15 * 15, 15 * 40] == -3.0


def test_the_colour_model_follows_touching_objects_better_than_sams_mask_alone():
    """Two balls, one in front of the other, the camera panning (a validation sequence of track_eval). SAM's
    low-res masks of the green ball are blocky where it meets the blue one, and fed back as the next prompt the
    errors compound; the colour model's evidence keeps the mask on the ball."""
    seq = generate_sequence(1500010, (256, 256), "pan")
    target = seq.targets[0]
    pipe = _shared_pipe()
    first = seq.frame(0)
    grounded = pipe.ground(pipe.encode(first.image), [seq.phrases[0]])
    grounded = [replace(grounded[0], mask=first.masks[target].astype(np.uint8) * 255)]   # a right start
    ious = {}
    for weight in (0.0, 3.0):
        tracker = ObjectTracker(pipe, TrackerConfig(colour_weight=weight))
        tracker.start(grounded, image=first.image)
        frames = list(seq.frames())[1:]
        ious[weight] = np.mean([_iou(tracker.update(f.image).objects[0].mask, f.masks[target]) for f in frames])
    assert ious[3.0] > ious[0.0] + 0.1, ious


def test_boxes_meet_only_when_they_share_a_pixel():
    box = (10.0, 10.0, 30.0, 20.0)
    assert cues.boxes_meet(box, (29.0, 19.0, 40.0, 40.0))
    assert not cues.boxes_meet(box, (30.0, 10.0, 40.0, 20.0))    # ends are exclusive: touching only
    assert not cues.boxes_meet(box, (10.0, 20.0, 30.0, 30.0))


@pytest.mark.parametrize("old, new, fill", [((-0.2, -0.3, 0.3, 0.2), (-0.15, -0.32, 0.35, 0.18), 0.0),    # moved
                                             ((-0.2, -0.3, 0.3, 0.2), (-0.3, -0.4, 0.4, 0.3), 0.1),      # and grown
                                             ((-0.9, -0.9, -0.5, -0.5), (-1.1, -1.0, -0.7, -0.6), 0.0)])  # off the edge
def test_the_prompt_warp_is_torchs_affine_grid_sample(old, new, fill):
    """The prompt memory moves with OpenCV on the CPU: the same numbers as torch's affine_grid + grid_sample."""
    rng = np.random.default_rng(0)
    prompt = cv2.blur((rng.random((64, 64)) > 0.5).astype(np.float32), (5, 5))
    sx, sy = (old[2] - old[0]) / (new[2] - new[0]), (old[3] - old[1]) / (new[3] - new[1])
    tx, ty = (old[0] + old[2]) / 2 - (new[0] + new[2]) / 2 * sx, (old[1] + old[3]) / 2 - (new[1] + new[3]) / 2 * sy
    grid = F.affine_grid(torch.tensor([[[sx, 0, tx], [0, sy, ty]]]), [1, 1, 64, 64], align_corners=False)
    expected = F.grid_sample(torch.from_numpy(prompt)[None, None] - fill, grid, align_corners=False)[0, 0] + fill
    got = cues.warp_prompt(prompt, old, new, fill)
    assert got.dtype == np.float32 and np.abs(got - expected.numpy()).max() < 1e-5
    assert np.abs(got - prompt).max() > 0.1       # it moved


def test_box_and_mask_geometry():
    box = (10.0, 10.0, 30.0, 20.0)
    assert cues.grow_box(box, 0.5, (25, 35)) == (0.0, 5.0, 35.0, 25.0)
    assert cues.grow_box(box, 0.1, (25, 35)) == pytest.approx((8.0, 9.0, 32.0, 21.0))
    mask = np.zeros((8, 8), bool)
    assert cues.mask_box(mask) is None
    mask[2:4, 2:4] = True
    assert cues.mask_box(mask) == (2.0, 2.0, 4.0, 4.0)
    moved = cues.shift_mask(mask, 3, -2)
    assert moved[0:2, 5:7].all() and moved.sum() == 4
    assert not cues.shift_mask(mask, 9, 0).any()
