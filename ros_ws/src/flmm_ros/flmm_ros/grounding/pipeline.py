"""GroundingPipeline: (image, instruction) -> spoken answer + one refined mask per grounded phrase.

    pipe = GroundingPipeline.from_config(PipelineConfig(model="models/tabletop_tiny"))
    frame = pipe.encode(rgb)                  # vision tower, LMM image prefix, SAM encoder: once per frame
    result = pipe.run(frame, "pick the red mug")

The F-LMM path per instruction: phrases -> one teacher-forced LMM pass over the cached image prefix
(phrase-row attention + hidden states) -> U-Net mask head -> crop padding -> SAM refiner.
With `backend: auto` on a CPU, the SAM encoder / decoder and the U-Net run on ONNX Runtime (inference only:
whenever gradients are on, as in training, the U-Net runs in PyTorch).
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from . import phrases as phrase_rules
from .answer_grounding import AnswerGroundingMixin
from .bundle import load_components
from .config import PipelineConfig
from .frame_encoding import FrameEncoding, GroundingLogits
from .head import GroundingHead
from .lmm import GROUNDING_PROMPT, LlavaAdapter, LMMAdapter, PhrasePass, PreparedImage
from .lmm.packed_linear import pack_linears
from .mask_head_engine import MaskHeadEngine
from .onnx_cache import default_cache_dir
from .onnx_runtime import OnnxRuntimeMissing
from .presence import foreground
from .sam.prompts import mask_to_box
from .sam.refiner import SamImageEncoding, SamRefiner
from .sam.backends import make_refiner_backend, resolve_backend
from .trust import TrustMixin
from .types import GroundedObject, GroundingError, GroundingResult
from .vision_engine import VisionEngine

MIN_IMAGE_SIDE = 8
log = logging.getLogger(__name__)
MAX_INSTRUCTION_CHARS = 1000


def validate_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise GroundingError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise GroundingError(f"image must be RGB uint8 of shape (H, W, 3), got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise GroundingError(f"image is too small ({image.shape[1]}x{image.shape[0]}); "
                             f"both sides must be at least {MIN_IMAGE_SIDE} px")
    return np.ascontiguousarray(image)


# Terminal escape sequences (ECMA-48: CSI "ESC [ ... final", OSC "ESC ] ... BEL|ESC \\", two-byte "ESC x") and
# then any other control or invisible format character: text pasted from a terminal must not become words.
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])|\x9b[0-?]*[ -/]*[@-~]")
IMAGE_TOKEN_TEXT = "<image>"


def clean_instruction(instruction: str) -> str:
    """The instruction without escape sequences and control/format characters, whitespace collapsed."""
    text = _ESCAPE_SEQUENCE.sub(" ", instruction)
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text)
    return " ".join(text.split())


def validate_instruction(instruction) -> str:
    """The cleaned instruction, or GroundingError saying what is wrong with it."""
    if not isinstance(instruction, str):
        raise GroundingError(f"the instruction must be text, got {type(instruction).__name__}")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise GroundingError(f"the instruction is too long ({len(instruction)} > {MAX_INSTRUCTION_CHARS} characters)")
    text = clean_instruction(instruction)
    if not text:
        raise GroundingError("the instruction is empty")
    if IMAGE_TOKEN_TEXT in text.lower():
        raise GroundingError(f"the instruction may not contain {IMAGE_TOKEN_TEXT!r}: it is the LMM's placeholder for "
                             "the camera image, which the node inserts itself; remove it")
    return text


def _timed(clock: "_StageClock", stage: str, call: Callable):
    """call(), timed as `stage` on `clock` (for a worker thread)."""
    with clock.stage(stage):
        return call()


class _StageClock:
    """Times named stages and reports each start to an optional progress callback. (A stage on a worker thread
    gets a clock without one: a cancellation raised there would stay in a FrameEncoding, which is reused.)

    On CUDA it synchronises at stage edges, so a stage's time is its own kernels' time."""

    def __init__(self, progress: Callable[[str], None] | None, device: str = "cpu",
                 timings: dict[str, float] | None = None):
        self.progress = progress
        self.sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
        self.timings: dict[str, float] = {} if timings is None else timings

    def stage(self, name: str):
        if self.progress is not None:
            self.progress(name)          # may raise GroundingCancelled
        return self._Timer(self, name)

    class _Timer:
        def __init__(self, clock, name):
            self.clock, self.name = clock, name

        def __enter__(self):
            if self.clock.sync:
                self.clock.sync()
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            if self.clock.sync:
                self.clock.sync()
            timings = self.clock.timings
            timings[self.name] = timings.get(self.name, 0.0) + time.perf_counter() - self.start


class GroundingPipeline(AnswerGroundingMixin, TrustMixin):
    """F-LMM end to end: a frozen LMM adapter, the trained grounding head and the SAM refiner (or none).

    `encode` runs the per-frame parts once; `answer`, `ground` and `run` (and `ask_region`, `ground_answer` from
    AnswerGroundingMixin) serve any number of instructions on that FrameEncoding. Thread-safe: one lock
    serialises every use of the LMM (its per-frame KV cache is extended and cropped in place), so threads may
    share a pipeline and its frames. `ground_logits` and `head_logits` (the training and evaluation tools' entry
    points) do not take that lock.
    """

    def __init__(self, lmm: LMMAdapter, head: GroundingHead, refiner: SamRefiner | None, config: PipelineConfig,
                 mask_head_engine: MaskHeadEngine | None = None):
        self.lmm = lmm
        self.head = head
        self.refiner = refiner
        self.config = config
        self.mask_head_engine = mask_head_engine   # the U-Net on ONNX Runtime (None: PyTorch)
        self._lock = threading.Lock()    # the per-frame KV cache is extended and cropped in place
        # A new frame's SAM encoder runs on a core of its own beside the LMM, where the CPU has one to spare.
        self.sam_beside_lmm = (refiner is not None and torch.device(config.device).type == "cpu"
                               and len(os.sched_getaffinity(0)) > torch.get_num_threads())
        self._sam_worker: tuple[int, ThreadPoolExecutor] | None = None     # (process id, worker): see _sam_pool

    @classmethod
    def from_config(cls, config: PipelineConfig | dict) -> "GroundingPipeline":
        cfg = PipelineConfig.from_dict(config) if isinstance(config, dict) else config
        if isinstance(config, PipelineConfig):
            cfg.validate()                        # from_dict has validated already
        lmm, head = load_components(cfg)
        cls._use_cpu_engines(cfg, lmm)
        pipe = cls(lmm, head, cls._refiner(cfg, head), cfg, cls._mask_head_engine(cfg, head, lmm))
        pipe.load_trust_parts()     # the bundle's presence calibration and plural head, read and checked now (trust.py)
        return pipe

    @staticmethod
    def _refiner(cfg: PipelineConfig, head: GroundingHead) -> SamRefiner | None:
        """SAM refiner of the head on the configured backend, or None when refinement is off."""
        if not cfg.refine:
            return None
        backend = make_refiner_backend(cfg.backend, head.sam, device=cfg.device,
                                       precision=cfg.sam_precision,
                                       cache_dir=cfg.engine_dir or None)
        return SamRefiner(head.sam, backend)

    @staticmethod
    def _mask_head_engine(cfg: PipelineConfig, head: GroundingHead, lmm: LMMAdapter | None = None
                          ) -> MaskHeadEngine | None:
        """The U-Net on ONNX Runtime when the backend means ONNX Runtime on a CPU (warns and uses PyTorch when
        onnxruntime is not installed), else None. With a fixed grid of image tokens (LLaVA-1.5) its graph is
        exported or loaded now, not at the first instruction."""
        if torch.device(cfg.device).type != "cpu" or resolve_backend(cfg.backend, cfg.device) == "torch":
            return None
        try:
            engine = MaskHeadEngine(head.mask_head, cfg.engine_dir or default_cache_dir())
        except OnnxRuntimeMissing as e:
            log.warning("mask head runs on PyTorch: %s", e)
            return None
        if isinstance(lmm, LlavaAdapter):   # LLaVA-1.5: always a grid x grid map (LLaVA-NeXT's size varies)
            engine(torch.full((1, head.mask_head.in_channels, lmm.grid, lmm.grid), 1.0 / lmm.grid ** 2))
        return engine

    @staticmethod
    def _use_cpu_engines(cfg: PipelineConfig, lmm: LMMAdapter) -> None:
        """When the backend means CPU engines (a CPU, not `backend: torch`, float32 weights that are not quantized):
        the LMM's linear layers on oneDNN for long passes (lmm/packed_linear.py), and LLaVA-1.5's vision tower +
        projector on ONNX Runtime, exported or loaded now, not at the first frame. Otherwise PyTorch runs them."""
        if (torch.device(cfg.device).type != "cpu" or resolve_backend(cfg.backend, cfg.device) == "torch"
                or lmm.dtype != torch.float32 or cfg.quantization != "none"):
            return
        pack_linears(lmm.model)
        if not isinstance(lmm, LlavaAdapter):
            return
        try:
            engine = VisionEngine(lmm.model, cfg.engine_dir or default_cache_dir())
        except OnnxRuntimeMissing as e:
            log.warning("vision tower runs on PyTorch: %s", e)
            return
        engine.session((1, 3, lmm.image_size, lmm.image_size))
        lmm.vision_engine = engine

    @property
    def head_device(self) -> torch.device:
        return self.head.text_proj.weight.device

    def _clock(self, progress: Callable[[str], None] | None = None) -> _StageClock:
        return _StageClock(progress, self.config.device)

    # ---- per frame -------------------------------------------------------------------------
    def encode(self, image: np.ndarray, progress: Callable[[str], None] | None = None) -> FrameEncoding:
        """The frame's vision features and SAM embedding. The LMM's image prefix is left to the frame's first pass:
        a grounding pass runs it in the same forward as its phrases (timed in its `phrase_pass`), one forward
        fewer per new frame; any other pass runs it first. `progress(stage)` may raise GroundingCancelled.

        With `sam_beside_lmm` (a CPU with a core more than torch's threads) SAM's encoder runs on a worker thread
        while the LMM works, and the frame's `sam` is waited for where it is first needed (the SAM decoder)."""
        image = validate_image(image)
        clock = self._clock(progress)
        sam = None
        if self.refiner is not None and self.sam_beside_lmm:
            with clock.stage("sam_encoder"):     # SAM's input resize; the encoder pass then goes to the worker
                encoder_pass = self.refiner.encode_later(image, self.config.sam_resize)
            worker_clock = _StageClock(None, self.config.device, clock.timings)   # no progress: see _StageClock
            sam = self._sam_pool().submit(_timed, worker_clock, "sam_encoder", encoder_pass)
        with self._lock:
            lmm_frame = self.lmm.encode_frame(image, clock.stage, defer_prefix=True)
            if self.refiner is not None and sam is None:
                with clock.stage("sam_encoder"):
                    sam = self.refiner.encode(image, self.config.sam_resize)
        return FrameEncoding(tuple(image.shape[:2]), lmm_frame, sam, clock.timings, image=image)

    def _sam_pool(self) -> ThreadPoolExecutor:
        """The SAM encoder's worker thread, made in this process: a forked child has no threads, and a pool copied
        from its parent would never run what it is given."""
        if self._sam_worker is None or self._sam_worker[0] != os.getpid():
            self._sam_worker = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-encoder"))
        return self._sam_worker[1]

    # ---- per instruction ---------------------------------------------------------------------
    def validate_instruction(self, instruction) -> str:
        """validate_instruction, and no special token of this LMM's tokenizer ('</s>' would end the prompt)."""
        text = validate_instruction(instruction)
        special = [t for t in getattr(self.lmm.tokenizer, "all_special_tokens", []) if t and t in text]
        if special:
            raise GroundingError(f"the instruction may not contain {special[0]!r}, a control token of the LMM's "
                                 "tokenizer; remove it")
        return text

    def answer(self, frame: FrameEncoding, instruction: str) -> str:
        instruction = self.validate_instruction(instruction)
        with self._lock:
            return self.lmm.generate(frame.lmm, instruction, self.config.max_new_tokens)

    def ground(self, frame: FrameEncoding, phrases: list[str],
               progress: Callable[[str], None] | None = None) -> list[GroundedObject]:
        """One mask per phrase (the F-LMM grounding prompt, phrases as the answer). `progress(stage)` may raise
        GroundingCancelled."""
        with self._lock, torch.no_grad():
            logits = self.ground_logits(frame, phrases, self._clock(progress))
        return self._objects(phrases, logits, frame.image_hw)

    def run(self, image_or_frame: np.ndarray | FrameEncoding, instruction: str,
            progress: Callable[[str], None] | None = None,
            on_objects: Callable[[GroundingResult], None] | None = None) -> GroundingResult:
        """Grounding and the spoken answer for one instruction. `progress(stage)` may raise GroundingCancelled.

        Masks first: in instruction mode the phrases are grounded before the answer is generated, and
        `on_objects(result)` receives them (answer still empty) as soon as they exist, so the time to a mask
        never includes the answer. In reasoning and conversation modes the masks come from the answer's tokens,
        so it is called after the answer, with it. In conversation mode each object is a noun phrase of the answer
        and `answer_span` gives its characters in the answer."""
        instruction = self.validate_instruction(instruction)
        frame = image_or_frame if isinstance(image_or_frame, FrameEncoding) else self.encode(image_or_frame)
        cached = frame.uses > 0
        clock = _StageClock(progress, self.config.device)

        def result(answer: str) -> GroundingResult:
            timings = clock.timings if cached else {**frame.timings, **clock.timings}
            return self._with_not_found(GroundingResult(instruction, answer, phrases, objects, dict(timings),
                                                        frame_cached=cached))

        with self._lock, torch.no_grad():
            frame.uses += 1
            answer = ""
            found = None
            if self.config.phrase_mode == "reasoning":
                answer, phrases, logits = self._run_reasoning(frame, instruction, clock)
            elif self.config.phrase_mode == "conversation":   # answer_grounding.py
                answer, found, logits = self._run_conversation(frame.lmm, frame.sam, instruction, clock)
                phrases = [p.text for p in found]
            else:
                with clock.stage("phrases"):
                    phrases = phrase_rules.phrases_from_instruction(instruction)
                # The presence questions ride along in the grounding pass (trust.py): one LMM forward, not two.
                logits = self.ground_logits(frame, phrases, clock, questions=self.presence_questions(phrases))
            with clock.stage("post"):
                objects = (self._answer_objects(found, logits, frame.image_hw) if found is not None
                           else self._objects(phrases, logits, frame.image_hw))
                if self.config.phrase_mode == "instruction":   # presence, instances: trust.py
                    objects = self._trusted_objects(frame, phrases, logits, objects)
        # Outside the lock: the callback may start work that needs the pipeline itself (the node starts tracking,
        # whose re-grounding takes this lock); holding it here would deadlock that.
        if on_objects is not None:
            on_objects(result(answer))
        if self.config.phrase_mode == "instruction" and self.config.answer:
            with self._lock, torch.no_grad(), clock.stage("answer"):
                answer = self._trusted_answer(frame, instruction, phrases, objects)
        return result(answer)

    def reasoning_logits(self, frame: FrameEncoding, question: str,
                         is_sentence: bool | None = None) -> tuple[str, str, GroundingLogits]:
        """F-LMM's reasoning segmentation of one question: (answer, phrase, logits of its one mask).
        `is_sentence` is the query type (ReasonSeg's label); None guesses it (phrases.is_sentence_query)."""
        with self._lock, torch.no_grad():
            answer, phrases, logits = self._run_reasoning(frame, question, _StageClock(None, self.config.device),
                                                          is_sentence)
        return answer, phrases[0], logits

    def _run_reasoning(self, frame: FrameEncoding, question: str, clock: _StageClock,
                       is_sentence: bool | None = None):
        """F-LMM's reason_seg: answer after "It is" (16 tokens at most), grounding the tokens fed while generating."""
        prompt = phrase_rules.reasoning_prompt(question, is_sentence)
        with clock.stage("answer"):
            out = self.lmm.reasoning_pass(frame.lmm, prompt, phrase_rules.REASONING_ANSWER_PREFIX,
                                          phrase_rules.REASONING_MAX_NEW_TOKENS)
        decode = self.lmm.tokenizer.decode
        generated = decode(out.generated_ids, skip_special_tokens=True).strip()
        answer = f"{phrase_rules.REASONING_ANSWER_PREFIX} {generated}".strip()
        with clock.stage("phrases"):
            phrases = [phrase_rules.reasoning_phrase(decode(out.grounded_ids, skip_special_tokens=True))]
        logits = self.head_logits(out.phrase_pass, frame.lmm.prepared, frame.sam, clock)
        return answer, phrases, logits

    def ground_logits(self, frame: FrameEncoding, phrases: list[str], clock: _StageClock | None = None,
                      prompt_text: str = GROUNDING_PROMPT, answer_prefix: str = "",
                      questions: list[str] = ()) -> GroundingLogits:
        """Phrase pass over the cached frame (with `questions` asked in the same forward), then the grounding head."""
        clock = clock or _StageClock(None, self.config.device)
        with clock.stage("phrase_pass"):
            lmm_out = self.lmm.phrase_pass(frame.lmm, phrases, prompt_text, answer_prefix, questions)
        return self.head_logits(lmm_out, frame.lmm.prepared, frame.sam, clock)

    def head_logits(self, lmm_out: PhrasePass, prepared: PreparedImage, sam: SamImageEncoding | None,
                    clock: _StageClock | None = None) -> GroundingLogits:
        """Mask head -> crop padding -> SAM refiner. Differentiable (the training tool calls this)."""
        clock = clock or _StageClock(None, self.config.device)
        with clock.stage("mask_head"):
            maps = lmm_out.maps.to(self.head_device).float()
            # The engine is inference only: its weights are a snapshot, and it has no gradients.
            use_engine = self.mask_head_engine is not None and not torch.is_grad_enabled()
            coarse = (self.mask_head_engine if use_engine else self.head.mask_head)(maps)[:, 0]
            coarse = self.lmm.crop_to_image(coarse, prepared)
        refined = tokens = iou = None
        if self.refiner is not None and sam is not None:
            with clock.stage("sam_decoder"):
                tokens = [self.head.text_embeddings(h.to(self.head_device).float()) for h in lmm_out.hidden_states]
                refined, iou = self.refiner.refine_scored(sam, coarse, tokens)
        return GroundingLogits(coarse, refined, tokens, iou, lmm_out)

    def _objects(self, phrases: list[str], logits: GroundingLogits,
                 image_hw: tuple[int, int]) -> list[GroundedObject]:
        threshold = self.config.mask_threshold
        if logits.refined is not None:
            foregrounds = [logits.refined_foreground(k, threshold) for k in range(len(phrases))]
        else:   # refiner off: the coarse logits, resized to the image like F-LMM's evaluation
            probs = F.interpolate(logits.coarse[None].float(), size=image_hw, mode="bilinear")[0].detach().sigmoid()
            foregrounds = [foreground(prob, threshold) for prob in probs]
        tokens = logits.tokens or [None] * len(phrases)
        return [self._object(p, fg, score, t) for p, (fg, score), t in zip(phrases, foregrounds, tokens)]

    @staticmethod
    def _object(phrase: str, fg: torch.Tensor, score: float, tokens: torch.Tensor | None = None) -> GroundedObject:
        mask = fg.to(torch.uint8).mul(255).cpu().numpy()
        # Kept for tracking: the phrase's prompt tokens, so a tracker never needs the LMM again.
        kept = None if tokens is None else tokens.detach().float().cpu().numpy()
        box = mask_to_box(fg)
        if box is None:
            return GroundedObject(phrase, mask, (0, 0, 0, 0), 0.0, kept)
        return GroundedObject(phrase, mask, tuple(int(v) for v in box.tolist()), score, kept)
