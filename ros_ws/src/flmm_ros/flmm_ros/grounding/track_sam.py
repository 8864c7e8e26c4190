"""SAM for the tracker: its own runtime (ONNX Runtime with an int8 image encoder on a CPU), one encoder pass per
frame, and decoder passes prompted with a track's mask memory, box and phrase tokens, at any image size."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from . import track_cues as cues
from .pipeline import FrameEncoding, GroundingPipeline
from .sam import OnnxRuntimeBackend, SamImageEncoding, SamRefiner, make_refiner_backend
from .sam.resize import SamResizeMaps
from .track_state import Candidate
from .tracking_config import TrackerConfig
from .types import GroundingError

PROMPT_LOGIT = 8.0          # a mask as a dense prompt: +-8, the range of a confident coarse map


class TrackerSam:
    """The tracker's SAM image encoder and prompt decoder (backend: `TrackerConfig.backend`, threads: `.threads`),
    separate from the pipeline's so that tracking never takes the pipeline's lock."""

    def __init__(self, pipeline: GroundingPipeline, cfg: TrackerConfig):
        device = torch.device(pipeline.config.device)
        name = pipeline.config.backend if cfg.backend == "auto" else cfg.backend
        if cfg.backend == "auto" and name in ("auto", "torch"):     # ONNX Runtime is ~3x faster on a CPU
            name = "onnxruntime" if device.type == "cpu" else "torch"
        # CPU: the pipeline's SAM precision (fp32 with dtype auto; fp16 is no faster there). GPU: fp16 unless the LMM
        # is float32, for speed (tracking is not F-LMM's path, which grounding reproduces).
        precision = (pipeline.config.sam_precision if device.type == "cpu"
                     else "fp32" if pipeline.config.dtype == "float32" else "fp16")
        if cfg.int8_encoder and name == "onnxruntime" and device.type == "cpu":
            precision = "int8"      # ~30 % faster encoder; tracking quality unchanged (onnx_export.py)
        self.backend = make_refiner_backend(name, pipeline.head.sam, device=device, precision=precision,
                                            cache_dir=pipeline.config.engine_dir or None)
        if isinstance(self.backend, OnnxRuntimeBackend) and self.backend.device.type == "cpu" and cfg.threads:
            self.backend.set_threads(cfg.threads)
        self.refiner = SamRefiner(pipeline.head.sam, self.backend)
        self.device = self.refiner.device
        self._resize_maps: dict[tuple[int, int], SamResizeMaps] = {}    # per image size

    def encode(self, image: np.ndarray, frame: FrameEncoding | None, interruptible: bool = False) -> SamImageEncoding:
        """The image's SAM embedding: `frame`'s when it has one (the pipeline's encoding of the same image), else one
        encoder pass; an `interruptible` one raises GroundingCancelled when `interrupt` ends it (ONNX Runtime)."""
        if frame is not None and frame.sam is not None:
            if tuple(frame.image_hw) != image.shape[:2]:
                raise GroundingError(f"the frame encoding is of a {frame.image_hw} image, not {image.shape[:2]}")
            return frame.sam
        can_end = interruptible and isinstance(self.backend, OnnxRuntimeBackend)
        with self.backend.interruptible() if can_end else nullcontext():
            return self.refiner.encode(image, resize="torch")     # within a grey level of PIL's, 3-4x faster

    def interrupt(self) -> None:
        """End the interruptible encoder pass in progress (from another thread), where the runtime can (ONNX
        Runtime; the others finish it)."""
        if isinstance(self.backend, OnnxRuntimeBackend):
            self.backend.interrupt()

    def maps(self, image_hw: tuple[int, int]) -> SamResizeMaps:
        """SAM's resizes for images of this size, as matrices (sam/resize.py): windows of them cost little."""
        if image_hw not in self._resize_maps:
            size, low = self.refiner.prompts.image_size, self.refiner.prompts.mask_prompt_size
            input_hw = self.refiner.prompts.transform.get_preprocess_shape(*image_hw, size)
            self._resize_maps[image_hw] = SamResizeMaps(size, low, input_hw, image_hw, low)
        return self._resize_maps[image_hw]

    def mask_prompt(self, mask: np.ndarray, image_hw: tuple[int, int],
                    window: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """A boolean image-size mask, empty outside `window` (x0, y0, x1, y1; default the whole image), as the
        (h, w) dense prompt of its +-PROMPT_LOGIT logits (`SamPromptGeometry.dense_prompts`' numbers)."""
        x0, y0, x1, y1 = window or (0, 0, image_hw[1], image_hw[0])
        return self.maps(image_hw).mask_prompt(mask[y0:y1, x0:x1], (x0, y0, x1, y1), PROMPT_LOGIT)

    @staticmethod
    def prompt_logits(memory: np.ndarray) -> np.ndarray:
        """A probability memory as the decoder's dense-prompt logits."""
        p = np.clip(memory, 1e-4, 1 - 1e-4)
        return np.clip(np.log(p / (1 - p)), -PROMPT_LOGIT, PROMPT_LOGIT).astype(np.float32)

    def warp(self, memory: np.ndarray, old_box: cues.Box, new_box: cues.Box, image_hw) -> np.ndarray:
        """The memory moved with the object from `old_box` to `new_box` (image pixels)."""
        size = self.refiner.prompts.image_size
        old, new = (tuple(v / size * 2 - 1 for v in self.maps(image_hw).to_input(b))
                    for b in (old_box, new_box))      # normalised coordinates of SAM's square input
        return cues.warp_prompt(memory, old, new)

    def decode(self, encoding: SamImageEncoding, prompt: np.ndarray, box: cues.Box, tokens: torch.Tensor) -> Candidate:
        """One decoder pass: `prompt` (h, w) dense-prompt logits, `box` (already grown) in image pixels."""
        sam_box = torch.tensor([self.maps(encoding.image_hw).to_input(box)], dtype=torch.float32, device=self.device)
        prompt = torch.from_numpy(np.ascontiguousarray(prompt, np.float32))[None, None].to(sam_box.device)
        low_res, iou = self.backend.decode(encoding.embedding, prompt, sam_box, tokens)
        confidence = min(max(float(iou.reshape(-1)[0]), 0.0), 1.0)
        return Candidate(None, None, 0, 0.0, confidence, low_res[0, 0].float().cpu().numpy())
