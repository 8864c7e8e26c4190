"""GroundingPipeline end to end on tiny random-weight bundles (real LLaVA / LLaVA-NeXT + SAM code paths)."""
import dataclasses
import multiprocessing
import os
import threading

import numpy as np
import pytest
import torch

from flmm_ros.grounding import phrases as phrase_rules
from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.lmm import GROUNDING_PROMPT
from flmm_ros.grounding.pipeline import FrameEncoding, GroundingPipeline
from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.grounding.types import GroundingCancelled, GroundingError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(write_random_bundle(tmp_path_factory.mktemp("bundle")))


@pytest.fixture(scope="module")
def pipe(bundle):
    return GroundingPipeline.from_config(PipelineConfig(model=bundle, max_new_tokens=6))


def image(seed=0, hw=(60, 90)):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


class CallCounter:
    def __init__(self, module):
        self.calls = 0
        if module is not None:
            module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_run_returns_one_mask_per_phrase_at_image_size(pipe):
    result = pipe.run(image(), "put the ball in the bowl")
    assert result.phrases == ["the ball", "the bowl"]
    assert [o.phrase for o in result.objects] == result.phrases
    for obj in result.objects:
        assert obj.mask.shape == (60, 90) and obj.mask.dtype == np.uint8
        assert set(np.unique(obj.mask)) <= {0, 255}
        ys, xs = np.nonzero(obj.mask)
        if ys.size:
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0.5 < obj.score <= 1.0
        else:
            assert obj.box == (0, 0, 0, 0) and obj.score == 0.0
    assert isinstance(result.answer, str)
    for stage in ("vision", "sam_encoder", "phrases", "answer", "phrase_pass", "mask_head", "sam_decoder", "post"):
        assert result.timings[stage] >= 0
    assert "lmm_prefix" not in result.timings     # a new frame's image prefix runs inside its phrase pass
    assert not result.frame_cached


def test_second_instruction_on_a_frame_reuses_the_encoding(pipe, monkeypatch):
    vision = CallCounter(None)                 # the vision tower (ONNX Runtime by default on a CPU)
    features = pipe.lmm.image_features
    monkeypatch.setattr(pipe.lmm, "image_features", lambda p: setattr(vision, "calls", vision.calls + 1)
                        or features(p))
    sam_encoder = CallCounter(None)            # the SAM backend's encoder (ONNX Runtime by default on a CPU)
    encode = pipe.refiner.backend.encode
    monkeypatch.setattr(pipe.refiner.backend, "encode", lambda x: setattr(sam_encoder, "calls", sam_encoder.calls + 1)
                        or encode(x))
    frame = pipe.encode(image(1))
    assert (vision.calls, sam_encoder.calls) == (1, 1)
    first = pipe.run(frame, "pick the red mug")
    second = pipe.run(frame, "grab the blue can")
    again = pipe.run(frame, "pick the red mug")
    assert (vision.calls, sam_encoder.calls) == (1, 1)
    assert not first.frame_cached and second.frame_cached and again.frame_cached
    assert "vision" not in again.timings and "lmm_prefix" not in again.timings
    np.testing.assert_array_equal(first.objects[0].mask, again.objects[0].mask)
    # And identical to grounding on a fresh encoding of the same image.
    fresh = pipe.run(image(1), "pick the red mug")
    np.testing.assert_array_equal(fresh.objects[0].mask, first.objects[0].mask)
    assert fresh.answer == first.answer


def test_greedy_answer_matches_transformers_generate(pipe):
    frame = pipe.encode(image(2))
    ours = pipe.lmm.generate(frame.lmm, "where is the red mug ?", max_new_tokens=6)
    ids = pipe.lmm.prompt_ids("where is the red mug ?", len(frame.lmm.image_keys))
    out = pipe.lmm.model.generate(input_ids=torch.tensor([ids]), pixel_values=frame.lmm.prepared.pixel_values,
                                  max_new_tokens=6, do_sample=False)
    reference = pipe.lmm.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert ours == reference


def test_refined_masks_differ_from_coarse_only(bundle):
    refined = GroundingPipeline.from_config(PipelineConfig(model=bundle, answer=False))
    coarse = GroundingPipeline.from_config(PipelineConfig(model=bundle, answer=False, refine=False))
    a = refined.run(image(3), "pick the mug")
    b = coarse.run(image(3), "pick the mug")
    assert "sam_decoder" in a.timings and "sam_decoder" not in b.timings and "sam_encoder" not in b.timings
    assert a.answer == "" and b.objects[0].mask.shape == (60, 90)


def test_reasoning_mode_grounds_the_answer(bundle):
    pipe = GroundingPipeline.from_config(PipelineConfig(model=bundle, phrase_mode="reasoning", max_new_tokens=4))
    result = pipe.run(image(4), "what can I drink from?")
    assert result.answer.startswith("It is")
    assert len(result.phrases) == 1 and len(result.objects) == 1


def test_reasoning_mode_is_flmms_recipe(bundle):
    """16 tokens after "It is" whatever max_new_tokens says (it is the instruction-mode answer's bound); the mask
    is the fed tokens' grounding; the spoken answer is "It is" + the generated text."""
    pipe = GroundingPipeline.from_config(PipelineConfig(model=bundle, phrase_mode="reasoning", max_new_tokens=4))
    frame = pipe.encode(image(4))
    question = "what can I drink from?"
    out = pipe.lmm.reasoning_pass(frame.lmm, phrase_rules.reasoning_prompt(question), "It is", 16)
    result = pipe.run(frame, question)

    def decode(ids):
        return pipe.lmm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert result.answer == f"It is {decode(out.generated_ids)}".strip()
    assert result.phrases == [phrase_rules.reasoning_phrase(decode(out.grounded_ids))]
    _, _, logits = pipe.reasoning_logits(frame, question)
    np.testing.assert_array_equal((logits.refined[0].sigmoid() > 0.5).numpy().astype(np.uint8) * 255,
                                  result.objects[0].mask)


def test_default_dtype_runs_sam_in_float32_like_flmm(pipe):
    assert pipe.config.dtype == "auto" and pipe.lmm.dtype == torch.float32
    assert pipe.refiner.backend.precision == "fp32"


def test_progress_reports_stages_and_can_cancel(pipe):
    seen = []
    pipe.run(image(5), "pick the mug", progress=seen.append)
    assert seen == ["phrases", "phrase_pass", "mask_head", "sam_decoder", "post", "answer"]

    def cancel_at_mask_head(stage):
        if stage == "mask_head":
            raise GroundingCancelled("cancelled by the test")

    frame = pipe.encode(image(5))
    with pytest.raises(GroundingCancelled):
        pipe.run(frame, "pick the mug", progress=cancel_at_mask_head)
    assert frame.lmm.cache.get_seq_length() == len(frame.lmm.prefix_ids)   # cache restored after the abort
    assert pipe.run(frame, "pick the mug").objects


def test_llava_next_bundle_runs(tmp_path):
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(write_random_bundle(tmp_path, family="llava_next")),
                                                        max_new_tokens=3))
    result = pipe.run(image(6, (40, 72)), "pick the red mug and the bowl")
    assert [o.mask.shape for o in result.objects] == [(40, 72), (40, 72)]


@pytest.mark.parametrize("bad,message", [
    (np.zeros((60, 90, 3), np.float32), "uint8"),
    (np.zeros((60, 90), np.uint8), "(H, W, 3)"),
    (np.zeros((60, 90, 4), np.uint8), "(H, W, 3)"),
    (np.zeros((4, 90, 3), np.uint8), "too small"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_images_are_rejected_clearly(pipe, bad, message):
    with pytest.raises(GroundingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe.encode(bad)


@pytest.mark.parametrize("instruction,message", [("", "empty"), ("   ", "empty"), ("x" * 2000, "too long"),
                                                 ("please", "no object"), ("\x1b[0m\x7f\u200b", "empty"),
                                                 ("pick <image> the mug", "may not contain '<image>'"),
                                                 ("pick the mug</s>", "may not contain '</s>'"),
                                                 (b"pick the mug", "must be text")])
def test_bad_instructions_are_rejected_clearly(pipe, instruction, message):
    with pytest.raises(GroundingError, match=message):
        pipe.run(image(), instruction)


@pytest.mark.parametrize("text,clean", [
    ("\x1b[31mpick the red mug\x7f", "pick the red mug"),          # colour escape + DEL
    ("\x1b]0;title\x07grab\tthe\r\nblue box", "grab the blue box"),  # OSC title, tabs, newlines
    ("pick\u200b the\x00 mug\x1bM", "pick the mug"),                 # zero-width space, NUL, ESC M
    ("\x9b1;2Hfind the ball", "find the ball"),                       # 8-bit CSI
])
def test_escape_sequences_and_control_characters_never_reach_the_phrases(pipe, text, clean):
    result = pipe.run(image(), text)
    assert result.instruction == clean
    assert result.phrases == phrase_rules.phrases_from_instruction(clean)


@pytest.mark.parametrize("settings,message", [
    ({"model": "/nonexistent/model"}, "not found"),
    ({"model": ""}, "no model"),
    ({"model": "x", "backend": "magic"}, "backend"),
    ({"model": "x", "dtype": "int8"}, "dtype"),
    ({"model": "x", "mask_threshold": 1.5}, "mask_threshold"),
    ({"model": "x", "colour": "red"}, "unknown pipeline settings"),
])
def test_bad_configuration_is_rejected_clearly(settings, message):
    with pytest.raises(GroundingError, match=message):
        GroundingPipeline.from_config(settings)


def test_plain_lmm_without_head_checkpoint_is_rejected(bundle):
    with pytest.raises(GroundingError, match="mask_head"):
        GroundingPipeline.from_config({"model": f"{bundle}/lmm"})


def test_missing_head_weights_are_reported(tmp_path):
    path = write_random_bundle(tmp_path)
    (path / "head.safetensors").unlink()
    with pytest.raises(GroundingError, match="head.safetensors"):
        GroundingPipeline.from_config({"model": str(path)})


def test_frame_encoding_is_reusable_type(pipe):
    frame = pipe.encode(image())
    assert isinstance(frame, FrameEncoding) and frame.image_hw == (60, 90)
    assert pipe.lmm.phrase_tokens(frame.lmm, ["the mug"], GROUNDING_PROMPT)[1][0].numel() == 2


def test_masks_come_before_the_answer_is_generated(pipe, monkeypatch):
    events, early = [], []
    generate = pipe.lmm.generate

    def recording_generate(*args, **kwargs):
        events.append("generate")
        return generate(*args, **kwargs)

    monkeypatch.setattr(pipe.lmm, "generate", recording_generate)
    monkeypatch.setattr(pipe.config, "answer_source", "lmm")    # the LMM's free answer (a command's grounded one
    # is worded from the masks, test_trust.py)

    def on_objects(partial):
        events.append("objects")
        early.append(partial)

    result = pipe.run(image(6), "put the ball in the bowl", on_objects=on_objects)
    assert events == ["objects", "generate"]          # the time to a mask never includes the answer
    (partial,) = early
    assert partial.answer == "" and isinstance(result.answer, str)
    assert [o.phrase for o in partial.objects] == [o.phrase for o in result.objects] == ["the ball", "the bowl"]
    assert all((a.mask == b.mask).all() for a, b in zip(partial.objects, result.objects))
    assert "answer" not in partial.timings and "answer" in result.timings and "post" in partial.timings


def test_reasoning_mode_hands_over_the_masks_with_their_answer(bundle):
    pipe = GroundingPipeline.from_config(PipelineConfig(model=bundle, phrase_mode="reasoning"))
    early = []
    result = pipe.run(image(7), "what can hold soup?", on_objects=early.append)
    assert len(early) == 1 and early[0].answer == result.answer and early[0].answer.startswith("It is")


def test_on_objects_may_use_the_pipeline_from_another_thread(pipe):
    """The node starts tracking from on_objects, and the tracker's re-grounding takes the pipeline's lock in its
    own thread: the callback must run outside that lock, or the two threads wait for each other for ever."""
    frame = pipe.encode(image(8))
    grounded = []

    def on_objects(partial):
        helper = threading.Thread(target=lambda: grounded.append(pipe.ground(frame, ["the ball"])))
        helper.start()
        helper.join(timeout=120)
        assert not helper.is_alive(), "the pipeline's lock was held while on_objects ran"

    pipe.run(frame, "pick the mug", on_objects=on_objects)
    assert len(grounded) == 1 and grounded[0][0].phrase == "the ball"


def test_sam_encoder_beside_the_lmm_gives_the_inline_result(pipe, monkeypatch):
    """A new frame's SAM encoder pass on the worker thread (a core to spare) gives what the inline pass gives,
    from the image as it was when encode returned: the caller may reuse its buffer at once."""
    rgb = image(7)
    monkeypatch.setattr(pipe, "sam_beside_lmm", False)
    inline = pipe.encode(rgb.copy())
    assert isinstance(inline.sam.embedding, torch.Tensor)

    monkeypatch.setattr(pipe, "sam_beside_lmm", True)
    release, threads = threading.Event(), []
    encode = pipe.refiner.backend.encode
    monkeypatch.setattr(pipe.refiner.backend, "encode",
                        lambda x: threads.append(threading.current_thread().name) or encode(x))
    pipe._sam_pool().submit(release.wait, 60)     # the worker is busy until the caller has reused its buffer
    buffer = rgb.copy()
    frame = pipe.encode(buffer)
    buffer[:] = 0
    release.set()
    assert torch.equal(frame.sam.embedding, inline.sam.embedding)
    assert threads and threads[0].startswith("sam-encoder")
    ours, theirs = pipe.run(frame, "pick the mug"), pipe.run(inline, "pick the mug")
    assert np.array_equal(ours.objects[0].mask, theirs.objects[0].mask)
    assert ours.timings["sam_encoder"] > 0


def test_a_failed_background_sam_pass_is_raised_where_the_frame_is_used(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "sam_beside_lmm", True)

    def broken(x):
        raise RuntimeError("encoder failed")
    with monkeypatch.context() as patch:
        patch.setattr(pipe.refiner.backend, "encode", broken)
        frame = pipe.encode(image(9))
        for _ in range(2):                   # every use of the frame, not only the first
            with pytest.raises(RuntimeError, match="encoder failed"):
                pipe.run(frame, "pick the mug")
    assert pipe.run(image(9), "pick the mug").objects


@pytest.mark.parametrize("cores, threads, device, beside", [(2, 1, "cpu", True), (2, 2, "cpu", False),
                                                            (1, 1, "cpu", False), (8, 4, "cuda", False)])
def test_sam_encoder_goes_beside_the_lmm_only_on_a_spare_cpu_core(pipe, monkeypatch, cores, threads, device,
                                                                   beside):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    config = dataclasses.replace(pipe.config, device=device)
    assert GroundingPipeline(pipe.lmm, pipe.head, pipe.refiner, config).sam_beside_lmm is beside


def test_a_forked_child_encodes_with_its_own_sam_worker(pipe, monkeypatch):
    """A pool copied into a forked child has no thread and would never run the SAM pass: the child makes its own."""
    monkeypatch.setattr(pipe, "sam_beside_lmm", True)
    expected = pipe.encode(image(11)).sam.embedding      # the parent's worker exists now

    def child(connection):
        try:
            connection.send(bool(torch.equal(pipe.encode(image(11)).sam.embedding, expected)))
        finally:
            os._exit(0)
    fork = multiprocessing.get_context("fork")
    receiver, sender = fork.Pipe(duplex=False)
    process = fork.Process(target=child, args=(sender,), daemon=True)
    process.start()
    try:
        assert receiver.poll(120), "the child's encode never finished"
        assert receiver.recv() is True
    finally:
        process.join(30)
        if process.is_alive():     # hung: never leave it behind
            process.kill()
            process.join()
