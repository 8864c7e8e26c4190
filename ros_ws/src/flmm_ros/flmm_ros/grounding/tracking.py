"""Tracking grounded objects at camera rate without the LMM: F-LMM's SAM refiner, prompted by the last mask.

    tracker = ObjectTracker(pipe, TrackerConfig())
    result = pipe.run(frame, "pick the red mug")
    tracker.start(result.objects, image=rgb)       # track ids 1, 2, ... (never reused)
    for rgb in camera:                             # once per camera frame
        for obj in tracker.update(rgb).objects:    # obj.track_id, .state, .mask, .box, .confidence
            ...

Per frame the SAM image encoder runs once (int8 weights on a CPU: `int8_encoder`); then, per object, one pass of
the prompt decoder with F-LMM's prompt set (`sam.prompt_decoder.SamPromptDecoder`; between the passes the tracker
works in NumPy on the search window): a dense mask prompt (the object's recent masks), a box (the last
mask's, grown by `box_margin`) and the phrase's tokens from the grounding pass (`GroundedObject.prompt_tokens`).
Before the pass the prompt is moved to where the object's pixels went (masked template matching); after it,
the mask is cut to the last box grown by `search_margin`, its logits get `colour_weight` x the log-ratio of the
object's colours to its surroundings' in the last frame (SAM's low-res mask blurs touching objects; the colours
tell them apart), blobs that do not overlap the last mask are dropped and holes filled.

The lost rule (thresholds in `TrackerConfig`): the new mask is kept when it is not empty or too small, the
decoder's predicted IoU (the frame's `confidence`) is high enough, its area did not jump, its colours still
match the object's at grounding, and no other track holds the same pixels; otherwise the object is `lost`,
with the reason, and its mask is empty. A lost object is looked for on every frame with its last good prompt
and, with `regrounding: auto`, by grounding its phrase again with the LMM every `reground_every` frames; the
same rule decides whether what was found is the object, which then keeps its track id.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import torch

from . import track_cues as cues
from .pipeline import FrameEncoding, GroundingPipeline, _StageClock, validate_image
from .sam import SamImageEncoding
from .track_sam import TrackerSam
from .track_state import Candidate, Track
from .tracking_config import LOST_REASONS, RUNTIME_SETTINGS, TRACK_STATES, TrackedObject, TrackerConfig, TrackingUpdate
from .types import GroundedObject, GroundingCancelled, GroundingError

__all__ = ["LOST_REASONS", "TRACK_STATES", "ObjectTracker", "TrackedObject", "TrackerConfig", "TrackingUpdate"]


class ObjectTracker:
    """Keeps grounded objects on every new camera frame (method and lost rule: the module docstring).

    Thread-safety: `update` (camera thread) and `start` / `stop` (instruction thread) may be called from different
    threads. Updates run one at a time on the tracks there were when they began; `start` and `stop` swap the list of
    tracks under a short lock, so they never wait for an update (an instruction that starts tracking is not delayed
    by the frame being tracked), and an update leaves out of its result the tracks stopped or replaced meanwhile.
    `interrupt` (any thread) makes the update in progress give way. SAM runs outside the pipeline's lock; only
    re-grounding takes it (through `pipeline.encode` / `ground`)."""

    def __init__(self, pipeline: GroundingPipeline, config: TrackerConfig | dict | None = None,
                 yield_to: Callable[[], bool] | None = None):
        """`yield_to()` True means the CPU is wanted elsewhere (the node: an instruction came or waits): an update
        then gives way as `interrupt` makes it, and a re-grounding stops at its next stage and is tried again on the
        next frame, so an instruction never waits for the LMM."""
        cfg = TrackerConfig.from_dict(config) if isinstance(config, dict) else (config or TrackerConfig())
        cfg.validate()
        self.pipeline, self.config, self.yield_to = pipeline, cfg, yield_to
        self.sam = TrackerSam(pipeline, cfg)
        self.backend, self.refiner = self.sam.backend, self.sam.refiner
        self._tracks: list[Track] = []
        self._next_id = 1
        self._frame_index = 0
        self._last_reground = -10**9
        self._lock = threading.Lock()              # the list of tracks, ids and config: held for moments only
        self._update_lock = threading.Lock()       # one update (or re-grounding) at a time
        self._interrupted = threading.Event()      # interrupt(): the update in progress gives way

    # ---- starting and stopping --------------------------------------------------------------------
    @torch.no_grad()
    def start(self, objects: list[GroundedObject], image: np.ndarray | None = None,
              frame: FrameEncoding | None = None, replace: bool = True) -> list[TrackedObject]:
        """Track `objects`, grounded on `image` (give it: the objects' appearance and first motion come from
        it; `frame`, its encoding, saves a SAM encoder pass). `replace` drops the tracks so far."""
        image = None if image is None else validate_image(image).copy()
        encoding = self.sam.encode(image, frame) if image is not None else None
        with self._lock:
            first_id, self._next_id = self._next_id, self._next_id + len(objects)
        new = [self._new_track(first_id + i, obj, image, encoding) for i, obj in enumerate(objects)]
        with self._lock:     # a new list: an update in progress keeps the one it began with
            self._tracks = new if replace else self._tracks + new
        return [t.out for t in new]

    def configure(self, config: TrackerConfig | dict) -> None:
        """New thresholds from the next frame on (tracks kept); the runtime's settings (RUNTIME_SETTINGS) cannot."""
        cfg = TrackerConfig.from_dict(config) if isinstance(config, dict) else config
        cfg.validate()
        for name in (n for n in RUNTIME_SETTINGS if getattr(cfg, n) != getattr(self.config, n)):
            raise GroundingError(f"tracker {name} cannot change on a running tracker: make a new one")
        with self._lock:
            self.config = cfg

    def stop(self, track_ids: list[int] | None = None) -> None:
        """Stop tracking these ids (all when None)."""
        with self._lock:
            self._tracks = [t for t in self._tracks if track_ids is not None and t.track_id not in track_ids]

    def interrupt(self) -> None:
        """Make the update in progress give way now (from another thread; the node calls it when an instruction
        comes): before or right after its SAM encoder pass, which ONNX Runtime ends at once, it returns
        `interrupted` with no track changed; one already past it finishes its objects, then skips re-grounding."""
        self._interrupted.set()
        self.sam.interrupt()

    @property
    def tracks(self) -> list[TrackedObject]:
        """The latest snapshot of every track."""
        with self._lock:
            return [t.out for t in self._tracks]

    def _new_track(self, track_id: int, obj: GroundedObject, image: np.ndarray | None,
                   encoding: SamImageEncoding | None) -> Track:
        if obj.prompt_tokens is None:
            raise GroundingError(f"{obj.phrase!r} has no prompt tokens to track it with: ground it with the SAM "
                                 "refiner on (refine: true)")
        mask = np.asarray(obj.mask) > 0
        if image is not None and image.shape[:2] != mask.shape:
            raise GroundingError(f"the mask of {obj.phrase!r} is {mask.shape}, the image {image.shape[:2]}")
        h, w = mask.shape
        box = cues.mask_box(mask)
        area = int(np.count_nonzero(mask))
        prompt = self.sam.mask_prompt(mask, (h, w))
        tokens = torch.as_tensor(obj.prompt_tokens, dtype=torch.float32, device=self.sam.device)[None]
        track = Track(track_id, obj.phrase, tokens, (h, w), mask, box or (0.0, 0.0, 0.0, 0.0), area, area,
                      cues.sigmoid(prompt), image)
        if box is None or area < self.config.min_area * h * w:
            track.state, track.reason = "lost", "empty" if box is None else "too_small"
        elif image is not None:
            track.colours = cues.colour_histogram(image, mask)
            track.descriptor = cues.embedding_descriptor(encoding.embedding, prompt)
        track.out = track.snapshot(mask if track.state == "tracking" else None, obj.score, obj.score)
        return track

    # ---- per frame -------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, image: np.ndarray, frame: FrameEncoding | None = None) -> TrackingUpdate:
        """Follow every object onto `image` (RGB uint8). `frame`, the pipeline's encoding of this same image,
        saves the SAM encoder and, when re-grounding, the LMM's encoding."""
        image = validate_image(image)
        with self._update_lock:
            self._interrupted.clear()
            with self._lock:
                tracks = self._tracks
            clock = _StageClock(None, self.pipeline.config.device)    # synchronises CUDA at stage edges
            encoding = None
            if tracks and not self._giving_way():
                image = image.copy()     # kept for the next frame's template matching; the caller may reuse it
                try:
                    with clock.stage("sam_encoder"):
                        encoding = self.sam.encode(image, frame, interruptible=True)
                except GroundingCancelled:       # interrupt() ended the encoder pass
                    pass
            if tracks and (encoding is None or self._giving_way()):   # the last moment before any track changes
                return TrackingUpdate(self._frame_index, [], clock.timings, interrupted=True)
            with self._lock:
                self._frame_index += 1
                index = self._frame_index
            if not tracks:
                return TrackingUpdate(index, [], clock.timings)
            if any(t.image_hw != encoding.image_hw for t in tracks):
                raise GroundingError(f"the image size changed from {tracks[0].image_hw} to "
                                     f"{encoding.image_hw}: start tracking again on the new images")
            found = {}
            for track in tracks:
                if track.state == "tracking" or self.config.recover:
                    cand = self._follow(track, encoding, image, clock)
                    if cand is not None:
                        found[track.track_id] = cand
            with clock.stage("post"):
                self._settle(tracks, found, image)
            regrounded = set()
            if self._reground_due(tracks):
                with clock.stage("reground"):
                    regrounded = self._reground(tracks, image, frame, encoding, self._yield)
            for track in tracks:
                if track.state == "lost" and track.track_id not in regrounded:
                    track.frames_lost += 1
                    track.out = track.snapshot(None, 0.0, track.out.confidence, track.out.appearance)
            with self._lock:     # not the tracks stopped or replaced meanwhile
                current = {id(t) for t in self._tracks}
            return TrackingUpdate(index, [t.out for t in tracks if id(t) in current], clock.timings)

    def reground(self, image: np.ndarray, frame: FrameEncoding | None = None) -> list[int]:
        """Ground every lost object's phrase again with the LMM now (also done by `update` with `regrounding:
        auto`); returns the ids found again. Call it after `update` on the same image."""
        image = validate_image(image)
        with self._update_lock:
            tracks = self._tracks
            encoding = self.sam.encode(image, frame)
            found = self._reground(tracks, image, frame, encoding)
            for track in tracks:
                if track.state == "lost" and track.track_id not in found:
                    track.out = track.snapshot(None, 0.0, track.out.confidence, track.out.appearance)
            return sorted(found)

    def _follow(self, track: Track, encoding: SamImageEncoding, image: np.ndarray, clock) -> Candidate | None:
        """One decoder pass for `track` on this frame; the candidate if it passes the lost rule."""
        prompt, box, previous = track.prompt, track.box, track.mask
        if self.config.motion == "template" and track.state == "tracking" and track.image is not None:
            with clock.stage("motion"):
                int_box = tuple(round(v) for v in track.box)
                dx, dy = cues.estimate_shift(track.image, image, track.mask, int_box)
                if dx or dy:
                    box = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
                    prompt = self.sam.warp(track.prompt, track.box, box, track.image_hw)
                    track.prompt = prompt            # the memory moves with the object, kept or not
                    previous = cues.shift_mask(track.mask, dx, dy)
        with clock.stage("sam_decoder"):
            cand = self._decode(encoding, self.sam.prompt_logits(prompt), box, track.tokens)
        with clock.stage("post"):
            cand = self._finish(cand, encoding, image, box, previous, track)
            reason = self._check(track, cand)
        if reason:
            if track.state == "tracking":
                self._lose(track, reason, cand)
            return None
        return cand

    def _settle(self, tracks: list[Track], found: dict[int, Candidate], image: np.ndarray,
                regrounded: bool = False) -> None:
        """Accept the candidates that passed the rule; one object, one track: tracks still tracking first (a
        re-found object never takes over one that is tracked), among them the one whose mask changed least since
        its last frame (a track drifting onto a neighbour changes a lot, the neighbour's own track little), then
        the most confident."""
        by_id = {t.track_id: t for t in tracks}

        def priority(i: int) -> tuple:
            # Steadiness only orders candidates that may claim one object (their boxes meet): image-size mask IoUs
            # for every object on every frame would cost more than the rest of the rule.
            track, box = by_id[i], found[i].box
            contested = any(j != i and cues.boxes_meet(box, found[j].box) for j in found)
            steady = cues.mask_iou(found[i].mask, track.mask) if contested and track.state == "tracking" else 0.0
            return track.state != "tracking", -steady, -found[i].confidence

        order = sorted(found, key=priority)
        taken = [t.mask for t in tracks if t.state == "tracking" and t.track_id not in found]
        for track_id in order:
            cand, track = found[track_id], by_id[track_id]
            if any(cues.mask_iou(cand.mask, m) > self.config.max_overlap for m in taken):
                if track.state == "tracking":
                    self._lose(track, "duplicate", cand)
                continue
            taken.append(cand.mask)
            self._accept(track, cand, image, regrounded)

    def _accept(self, track: Track, cand: Candidate, image: np.ndarray, regrounded: bool) -> None:
        new = (self.sam.mask_prompt(cand.mask, track.image_hw, cand.window) if self.config.dense_prompt == "mask"
               else cand.low_res)
        m = self.config.memory if track.state == "tracking" else 0.0   # re-found: the old memory is elsewhere
        track.prompt = m * track.prompt + (1 - m) * cues.sigmoid(new)
        track.state, track.reason, track.frames_lost = "tracking", "", 0
        track.age += 1
        track.mask, track.box, track.area, track.image = cand.mask, cand.box, cand.area, image
        track.largest_area = max(track.largest_area, cand.area)
        if track.colours is None:            # started without its image: the first tracked frame decides
            track.colours, track.descriptor = cand.colours, cand.descriptor
        track.out = track.snapshot(cand.mask, cand.score, cand.confidence, cand.appearance, regrounded)

    def _lose(self, track: Track, reason: str, cand: Candidate) -> None:
        """Lost: the prompt, box and mask stay those of the last good frame, to look for it there again."""
        track.state, track.reason = "lost", reason
        track.out = track.snapshot(None, 0.0, cand.confidence, cand.appearance)

    def _check(self, track: Track, cand: Candidate) -> str:
        """'' when the candidate passes the lost rule, else the reason it fails."""
        cfg = self.config
        h, w = track.image_hw
        if cand.area == 0 or cand.area < cfg.min_area * h * w:
            if track.state == "tracking" and cues.touches_border(track.box, track.image_hw):
                return "left_view"
            return "empty" if cand.area == 0 else "too_small"
        if cand.confidence < cfg.min_confidence:
            return "low_confidence"
        if track.state == "tracking":
            if not 1 / cfg.max_area_change <= cand.area / max(1, track.area) <= cfg.max_area_change:
                return "area_jump"
        elif cand.area > cfg.max_area_change * track.largest_area:
            return "area_jump"
        if track.colours is not None and cand.colours is not None:
            cand.appearance = cues.histogram_similarity(track.colours, cand.colours)
            if cand.appearance < cfg.min_colour_similarity:
                return "colour"
        # Re-finding an object needs more evidence than following it from one frame to the next.
        min_similarity = cfg.min_similarity if track.state == "tracking" else cfg.min_refound_similarity
        if min_similarity > 0 and track.descriptor is not None and cand.descriptor is not None:
            if float(torch.dot(track.descriptor, cand.descriptor)) < min_similarity:
                return "appearance"
        return ""

    # ---- re-grounding ------------------------------------------------------------------------------------
    def _reground_due(self, tracks: list[Track]) -> bool:
        return (self.config.regrounding == "auto" and any(t.state == "lost" for t in tracks)
                and self._frame_index - self._last_reground >= self.config.reground_every)

    def _reground(self, tracks: list[Track], image: np.ndarray, frame: FrameEncoding | None, encoding: SamImageEncoding,
                  progress: Callable[[str], None] | None = None) -> set[int]:
        """Ground the lost objects' phrases with the LMM; a mask that passes the rule (after one pass of the
        tracker's decoder prompted with it) gives the object back under its id. Returns the ids found."""
        self._last_reground = self._frame_index
        lost = [t for t in tracks if t.state == "lost"]
        if not lost:
            return set()
        try:
            frame = frame if frame is not None and frame.lmm is not None else self.pipeline.encode(image, progress)
            grounded = self.pipeline.ground(frame, [t.phrase for t in lost], progress)
        except GroundingCancelled:      # the LMM is wanted elsewhere: try again on the next frame
            self._last_reground = self._frame_index - self.config.reground_every + 1
            return set()
        found = {}
        for track, obj in zip(lost, grounded):
            mask = cues.largest_component(obj.mask > 0)
            box = cues.mask_box(mask)
            if box is None:
                continue
            cand = self._decode(encoding, self.sam.mask_prompt(mask, track.image_hw), box, track.tokens)
            cand = self._finish(cand, encoding, image, box, mask, track)
            if not self._check(track, cand):
                found[track.track_id] = cand
        self._settle(tracks, found, image, regrounded=True)
        return {t.track_id for t in lost if t.track_id in found and t.state == "tracking"}

    def _giving_way(self) -> bool:
        return self._interrupted.is_set() or (self.yield_to is not None and self.yield_to())

    def _yield(self, _stage: str) -> None:
        if self._giving_way():
            raise GroundingCancelled("the LMM is wanted elsewhere")

    # ---- SAM's passes -----------------------------------------------------------------------------------
    def _decode(self, encoding: SamImageEncoding, prompt: np.ndarray, box: cues.Box, tokens: torch.Tensor) -> Candidate:
        """One decoder pass (track_sam.py) with the box grown by box_margin."""
        return self.sam.decode(encoding, prompt, cues.grow_box(box, self.config.box_margin, encoding.image_hw), tokens)

    def _finish(self, cand: Candidate, encoding: SamImageEncoding, image: np.ndarray, box: cues.Box,
                previous: np.ndarray, track: Track) -> Candidate:
        """Cut the mask to the search window, sharpen it with the object's colour model, clean it, and measure
        its area, box and appearance (all on the window's crop, in NumPy: the rest of the image is empty)."""
        x0, y0, x1, y1 = cand.window = tuple(round(v) for v in cues.grow_box(box, self.config.search_margin,
                                                                             track.image_hw))
        logits = self.sam.maps(track.image_hw).postprocess(cand.low_res, cand.window)   # window only
        if self.config.colour_weight and track.state == "tracking" and track.image is not None:
            ratio = cues.colour_log_ratio(track.image[y0:y1, x0:x1], track.mask[y0:y1, x0:x1], image[y0:y1, x0:x1])
            if ratio is not None:
                logits += self.config.colour_weight * ratio
        threshold = self.config.mask_threshold
        crop = logits > math.log(threshold / (1 - threshold))        # sigmoid(logits) > mask_threshold
        if self.config.clean and crop.any():
            crop = cues.clean_mask(crop, previous[y0:y1, x0:x1])
        cand.mask = np.zeros(track.image_hw, bool)
        cand.mask[y0:y1, x0:x1] = crop
        cand.area = int(np.count_nonzero(crop))
        cand.box = None
        if cand.area:
            top, bottom, left, right = cues.mask_bounds(crop)
            cand.box = (float(x0 + left), float(y0 + top), float(x0 + right), float(y0 + bottom))
            cand.score = float(cues.sigmoid(logits[crop]).mean())     # mean foreground probability
            cand.colours = cues.colour_histogram(image[y0:y1, x0:x1], crop)
            if track.state != "tracking" or self.config.min_similarity > 0 or track.descriptor is None:
                cand.descriptor = cues.embedding_descriptor(encoding.embedding, cand.low_res)   # else unused
        return cand
