"""Grounded conversation and region input: the GLaMM / AnyRef capabilities of a frozen LMM, as a mixin of
GroundingPipeline (pipeline.py keeps F-LMM's instruction and reasoning paths).

- Grounded conversation (`phrase_mode: conversation` in `run`, and `ground_answer` for a given text): every noun
  phrase of the answer (noun_phrases.py) is grounded from the answer's own tokens in one teacher-forced pass over
  the cached frame (conversation.py); each object carries `answer_span`, its characters in the answer.
- Region input (`ask_region`): SAM segments a clicked point or a box (sam/region.py); the LMM is asked about a
  visual prompt of that region (region.py); the answer's phrase that overlaps the region names it, and F-LMM's
  own grounding of that name on the camera frame replaces SAM's click mask when it still holds the click.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import conversation
from . import region as region_prompts
from .lmm import GROUNDING_PROMPT, LMMFrame
from .noun_phrases import NounPhrase
from .presence import foreground
from .sam.region import segment_region
from .types import GroundingError, GroundingResult


class AnswerGroundingMixin:
    """Grounded conversation and region input for GroundingPipeline. Uses its LMM, head, refiner, lock and stage
    clock, and is thread-safe the same way (every use of the LMM holds the pipeline's lock)."""

    def ground_answer(self, frame, answer: str, prompt: str = GROUNDING_PROMPT) -> GroundingResult:
        """Grounded conversation over a given answer (another model's, a reference text): its noun phrases are
        grounded from its tokens, teacher-forced after `prompt`; objects carry their `answer_span` in it."""
        prompt, text = self.validate_instruction(prompt), self.validate_instruction(answer)
        clock = self._clock()
        with self._lock, torch.no_grad():
            text, found, logits = self._run_conversation(frame.lmm, frame.sam, prompt, clock,
                                                         self.lmm.text_ids(text))
            objects = self._answer_objects(found, logits, frame.image_hw)
        return GroundingResult(prompt, text, [p.text for p in found], objects, clock.timings, frame_cached=True)

    def _answer_objects(self, found: list[NounPhrase], logits, image_hw: tuple[int, int]) -> list:
        """One GroundedObject per noun phrase of the answer, with its span in the answer."""
        objects = self._objects([p.text for p in found], logits, image_hw) if found else []
        for obj, phrase in zip(objects, found):
            obj.answer_span = (phrase.start, phrase.end)
        return objects

    def _run_conversation(self, lmm_frame: LMMFrame, sam, prompt: str, clock, ids: list[int] | None = None):
        """A free answer to `prompt` (or the given answer `ids`), then its noun phrases grounded from the answer's
        own tokens in one teacher-forced pass. Returns (answer, phrases, logits; None when no phrase was found)."""
        if ids is None:
            with clock.stage("answer"):
                ids = self.lmm.generate_ids(lmm_frame, prompt, self.config.max_new_tokens)
        with clock.stage("phrases"):
            answer = conversation.answer_tokens(self.lmm.tokenizer, ids)
            found = conversation.grounded_phrases(answer)
        if not found:
            return answer.text, [], None
        with clock.stage("phrase_pass"):
            out = self.lmm.answer_pass(lmm_frame, prompt, ids, [rows for _, rows in found])
        return answer.text, [p for p, _ in found], self.head_logits(out, lmm_frame.prepared, sam, clock)

    def ask_region(self, frame, question: str | None = None, point=None, box=None, prompting: str = "crop",
                   progress: Callable[[str], None] | None = None) -> GroundingResult:
        """Region input: what is at a pixel `point` (x, y) and/or inside a `box` (x0, y0, x1, y1, x1/y1 exclusive)?

        1. SAM segments the region from the point/box on the frame's cached embedding (sam/region.py).
        2. The frozen LMM answers `question` (None: F-LMM's "Please give me a description of the image.") about a
           visual prompt of the region (`prompting`: crop | highlight | marker | none, region.py).
        3. The answer's noun phrases are grounded in the picture the LMM saw; the one whose mask overlaps the
           region most names it (`phrase`, and `answer_span` its characters in the answer; "region" and None when
           no phrase overlaps it).
        4. That name is grounded on the camera frame (F-LMM's phrase pass and refiner); its mask replaces SAM's
           when it still holds the click (for a box alone: when its box overlaps the given one at IoU >= 0.5).
        The result has that one object. `progress(stage)` may raise GroundingCancelled, as in `run`."""
        if getattr(frame, "image", None) is None:
            raise GroundingError("ask_region needs a FrameEncoding from encode() (it keeps the image to prompt)")
        if self.refiner is None or frame.sam is None:
            raise GroundingError("region input needs the SAM refiner: set refine: true")
        region = region_prompts.RegionPrompt.check(point, box, frame.image_hw, prompting)
        question = GROUNDING_PROMPT if question is None else self.validate_instruction(question)
        cached = frame.uses > 0
        clock = self._clock(progress)
        with self._lock, torch.no_grad():
            frame.uses += 1
            with clock.stage("sam_decoder"):
                logits, _ = segment_region(self.refiner, frame.sam, region.point, region.box)
            with clock.stage("post"):
                obj = self._object("region", *foreground(logits.float().sigmoid(), self.config.mask_threshold))
                view = region_prompts.visual_prompt(frame.image, *region.mask_and_box(obj), prompting)
            view_frame = frame.lmm if prompting == "none" else self.lmm.encode_frame(view.image, clock.stage)
            answer, found, view_logits = self._run_conversation(view_frame, None, question, clock)
            name = self._region_name(found, view_logits, view.mask)
            if name is not None:
                named = self._objects([name.text], self.ground_logits(frame, [name.text], clock), frame.image_hw)[0]
                obj = named if region.holds(named.mask > 0) else obj
                obj.phrase, obj.answer_span = name.text, (name.start, name.end)
        timings = clock.timings if cached else {**frame.timings, **clock.timings}
        return GroundingResult(question, answer, [obj.phrase], [obj], dict(timings), frame_cached=cached)

    @staticmethod
    def _region_name(found: list[NounPhrase], logits, region_mask: np.ndarray) -> NounPhrase | None:
        """The answer's phrase whose coarse mask (logit > 0, in the picture the LMM saw) overlaps the region most."""
        if not found:
            return None
        masks = F.interpolate(logits.coarse[None].float(), size=region_mask.shape, mode="bilinear")[0] > 0
        best, _ = region_prompts.best_match(masks.cpu().numpy(), region_mask)
        return None if best is None else found[best]
