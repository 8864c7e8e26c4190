"""Pipeline configuration: one flat dataclass; each field carries its default, description and choices."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .quantization import QUANTIZATIONS, check_quantization
from .settings import from_settings, setting
from .types import GroundingError

# "auto" is F-LMM's setting: its configs load the LMM in bfloat16 (on GPUs); on a CPU we keep float32.
DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
INSTANCE_MODES = ("auto", "off")
RELATION_MODES = ("auto", "off")
SAM_RESIZES = ("torch", "pil")
ANSWER_SOURCES = ("grounded", "lmm")
PHRASE_MODES = ("instruction", "reasoning", "conversation")


@dataclass
class PipelineConfig:
    """Everything that decides what the pipeline computes. Field names equal the ROS node's parameter names."""
    model: str = setting("", "Model bundle directory, or a Hugging Face LLaVA id/path (then mask_head and "
                             "sam_checkpoint are needed). Empty = the embedded tabletop-tiny model shipped with "
                             "the package.")
    mask_head: str = setting("", "F-LMM mask-head checkpoint (.pth) or ours (.safetensors); overrides a bundle's "
                                 "head when set.")
    sam_checkpoint: str = setting("", "Official SAM checkpoint (sam_vit_*.pth), needed with a plain LMM.")
    sam_type: str = setting("vit_l", "SAM size of sam_checkpoint.", ("vit_b", "vit_l", "vit_h"))
    prompt_template: str = setting("", "LMM chat template: vicuna | mistral | a format string with {input}; "
                                       "empty = the model's own.")
    backend: str = setting("auto", "Runtime of the SAM refiner, the U-Net mask head and LLaVA-1.5's vision tower. "
                                   "auto = ONNX Runtime for all three on a CPU, PyTorch on CUDA; onnxruntime / "
                                   "tensorrt name SAM's runtime (the mask head and the vision tower run on ONNX "
                                   "Runtime whenever SAM does on a CPU, and the LMM's linear layers on oneDNN with "
                                   "packed weights); torch = PyTorch for all.",
                           BACKENDS)
    sam_resize: str = setting("torch", "SAM's input resize. torch = torch's antialiased bilinear, 3-4x faster (640x480 "
                                       "to 1024: 3.3 against 8.7 ms) and within one or two grey levels of PIL; pil = "
                                       "segment-anything's apply_image, the input F-LMM gives SAM bit for bit.",
                              SAM_RESIZES)
    engine_dir: str = setting("", "Cache directory for SAM ONNX files and TensorRT plans (empty = engines/cache).")
    device: str = setting("cpu", "Torch device for the LMM and mask head: cpu, cuda, cuda:1 ...")
    dtype: str = setting("auto", "LMM dtype. auto = bfloat16 on CUDA with SAM in float32 (as F-LMM ran), "
                                 "float32 on CPU; float16/bfloat16 also run SAM in fp16.", tuple(DTYPES))
    quantization: str = setting("none", "LMM weights: none (dtype), int8 or int4 weight-only (torchao; int4 on CUDA "
                                        "needs dtype bfloat16 and accelerate). For a 7B LMM in 16 GB.",
                                QUANTIZATIONS)
    answer: bool = setting(True, "Generate a short spoken answer to each instruction.")
    max_new_tokens: int = setting(24, "Most tokens generated for the spoken answer (reasoning mode generates "
                                      "F-LMM's 16 after 'It is').")
    phrase_mode: str = setting("instruction", "instruction: ground the objects named in the instruction; "
                                              "reasoning: ground the answer (F-LMM's recipe); conversation: answer "
                                              "freely and ground every noun phrase of the answer from its own "
                                              "tokens, each object with its character span in the answer (raise "
                                              "max_new_tokens for long answers).",
                               PHRASE_MODES)
    mask_threshold: float = setting(0.5, "Foreground probability above which a pixel belongs to a published "
                                         "mask, in (0, 1).")
    refine: bool = setting(True, "Refine the mask head's coarse masks with SAM (false: publish the coarse masks).")
    presence_threshold: float = setting(0.5, "Instruction mode: presence probability (calibrated, presence.py) below "
                                             "which a phrase is judged absent: its object gets found=false and an "
                                             "empty mask, and the result lists it in not_found. In [0, 1); 0 = "
                                             "never absent (F-LMM).")
    instances: str = setting("auto", "Instruction mode: auto = a plural or quantified phrase ('all the mugs', "
                                     "'both boxes') gives one object per instance (needs the refiner); off = one "
                                     "mask per phrase (F-LMM).", INSTANCE_MODES)
    max_instances: int = setting(8, "Most instances returned for one plural phrase.")
    instance_threshold: float = setting(-1.0, "Instruction mode: the instance filter's probability (bundle "
                                              "`instances:`, instance_filter.py) below which an instance of a "
                                              "plural phrase is dropped; higher: fewer wrong instances, more "
                                              "missed. -1 = the bundle's threshold (chosen for the best F1); "
                                              "else in [0, 1).")
    relations: str = setting("auto", "Instruction mode: auto = a nearness phrase ('the ball next to the bowl') is "
                                     "checked on the instances of both objects when the bundle has a relation "
                                     "calibration (relations.py; needs instances: auto), and its object is the "
                                     "ball nearest the bowl; off = judged by the object it names, F-LMM's mask "
                                     "(~160 ms less per such phrase on a 2-core CPU).", RELATION_MODES)
    answer_source: str = setting("grounded", "Instruction mode: grounded = the spoken answer states what the "
                                             "grounding found (absent phrases, places from the masks, yes/no and "
                                             "counts), the LMM wording the rest; lmm = the LMM's free answer "
                                             "(F-LMM).", ANSWER_SOURCES)

    @classmethod
    def from_dict(cls, values: dict) -> "PipelineConfig":
        return from_settings(cls, values, "pipeline")

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if not self.model:
            raise GroundingError("no model given: set 'model' to a model bundle directory or an LMM id")
        if self.dtype not in DTYPES:
            raise GroundingError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.backend not in BACKENDS:
            raise GroundingError(f"backend {self.backend!r} is not one of {list(BACKENDS)}")
        if self.sam_resize not in SAM_RESIZES:
            raise GroundingError(f"sam_resize {self.sam_resize!r} is not one of {list(SAM_RESIZES)}")
        check_quantization(self.quantization, self.device, self.torch_dtype)
        if self.phrase_mode not in PHRASE_MODES:
            raise GroundingError(f"phrase_mode {self.phrase_mode!r} is not one of {list(PHRASE_MODES)}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise GroundingError(f"mask_threshold must be a probability in (0, 1), got {self.mask_threshold}")
        if self.max_new_tokens < 1:
            raise GroundingError("max_new_tokens must be at least 1")
        if not 0.0 <= self.presence_threshold < 1.0:
            raise GroundingError(f"presence_threshold must be a probability in [0, 1), got {self.presence_threshold}")
        if self.instances not in INSTANCE_MODES:
            raise GroundingError(f"instances {self.instances!r} is not one of {list(INSTANCE_MODES)}")
        if self.relations not in RELATION_MODES:
            raise GroundingError(f"relations {self.relations!r} is not one of {list(RELATION_MODES)}")
        if self.max_instances < 1:
            raise GroundingError("max_instances must be at least 1")
        if self.instance_threshold != -1.0 and not 0.0 <= self.instance_threshold < 1.0:
            raise GroundingError(f"instance_threshold must be -1 (the bundle's) or a probability in [0, 1), got "
                                 f"{self.instance_threshold}")
        if self.answer_source not in ANSWER_SOURCES:
            raise GroundingError(f"answer_source {self.answer_source!r} is not one of {list(ANSWER_SOURCES)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise GroundingError(f"device {self.device!r} requested but CUDA is not available")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The LMM dtype; auto = bfloat16 on CUDA (F-LMM's configs), float32 on the CPU."""
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return DTYPES[self.dtype]

    @property
    def sam_precision(self) -> str:
        """SAM's precision: fp16 with a float16 / bfloat16 LMM, else fp32 (also with auto, as F-LMM ran)."""
        return "fp16" if self.dtype in ("float16", "bfloat16") else "fp32"
