"""The SAM wing of the grounding core: F-LMM's SAM refiner and the runtimes it runs on.

- `prompts.py`: SAM's prompt geometry (input frame, F-LMM's dense and box prompts, post-processing);
- `resize.py`: a faster input resize (the pipeline's default, the tracker's), the tracker's resizes as matrices;
- `refiner.py`: `SamRefiner`, the geometry composed with a backend; `SamImageEncoding`;
- `backends.py`: the runtimes (PyTorch, ONNX Runtime, TensorRT) behind one `RefinerBackend` interface, with
  fallbacks; `shapes.py` their common input checks; `parity.py` the gates between them;
- `prompt_decoder.py`: SAM's prompt encoder + mask decoder as one module with F-LMM's prompt set;
- `models.py`: SAM sizes (presets, custom, the one parser of a size given on a command line);
- `onnx_export.py`, `tensorrt.py`: the ONNX graphs and TensorRT plans, cached by content.
"""
from .backends import OnnxRuntimeBackend, RefinerBackend, TorchBackend, make_refiner_backend
from .prompts import SamPromptGeometry, mask_to_box
from .refiner import SamImageEncoding, SamRefiner

__all__ = ["OnnxRuntimeBackend", "RefinerBackend", "SamImageEncoding", "SamPromptGeometry", "SamRefiner",
           "TorchBackend", "make_refiner_backend", "mask_to_box"]
