"""Pipeline configuration: one flat dataclass, field names equal the ROS node's parameter names."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from .types import GroundingError

# "auto" is F-LMM's setting: its configs load the LMM in bfloat16 (on GPUs); on a CPU we keep float32.
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("torch", "onnxruntime", "tensorrt")
PHRASE_MODES = ("instruction", "reasoning")


@dataclass
class PipelineConfig:
    model: str = ""                 # model bundle directory, or a Hugging Face LMM id/path (then mask_head is needed)
    mask_head: str = ""             # F-LMM .pth or our .safetensors; overrides the bundle's head when set
    sam_checkpoint: str = ""        # official sam_vit_*.pth (needed with a plain LMM)
    sam_type: str = "vit_l"         # SAM size for sam_checkpoint: vit_b | vit_l | vit_h
    prompt_template: str = ""       # vicuna | mistral | a format string with {input}; empty = the model's own
    backend: str = "torch"          # SAM refiner backend: torch | onnxruntime | tensorrt
    engine_dir: str = ""            # where ONNX files / TensorRT plans are cached (empty = engines/cache)
    device: str = "cpu"
    dtype: str = "auto"             # LMM dtype: auto | float32 | float16 | bfloat16. auto: bfloat16 on CUDA with SAM
    #                                 in float32 (F-LMM), float32 on CPU; float16/bfloat16 also run SAM in fp16
    answer: bool = True             # generate a spoken answer
    max_new_tokens: int = 24        # the spoken answer (reasoning mode generates F-LMM's 16 after "It is")
    phrase_mode: str = "instruction"  # instruction: ground the instruction's objects; reasoning: ground the answer
    mask_threshold: float = 0.5     # foreground probability threshold for the published masks
    refine: bool = True             # run the SAM refiner (False: publish the mask head's coarse masks)

    @classmethod
    def from_dict(cls, values: dict) -> "PipelineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GroundingError(f"unknown pipeline settings {unknown}; known: {sorted(known)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if not self.model:
            raise GroundingError("no model given: set 'model' to a model bundle directory or an LMM id")
        if self.dtype not in DTYPES:
            raise GroundingError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.backend not in BACKENDS:
            raise GroundingError(f"backend {self.backend!r} is not one of {list(BACKENDS)}")
        if self.phrase_mode not in PHRASE_MODES:
            raise GroundingError(f"phrase_mode {self.phrase_mode!r} is not one of {list(PHRASE_MODES)}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise GroundingError(f"mask_threshold must be a probability in (0, 1), got {self.mask_threshold}")
        if self.max_new_tokens < 1:
            raise GroundingError("max_new_tokens must be at least 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise GroundingError(f"device {self.device!r} requested but CUDA is not available")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The LMM dtype; auto = bfloat16 on CUDA (F-LMM's configs), float32 on the CPU."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return DTYPES[self.dtype]
