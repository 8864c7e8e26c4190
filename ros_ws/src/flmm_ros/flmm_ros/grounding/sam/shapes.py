"""The tensor shapes a SAM model's encoder and prompt decoder take, with checks that fail in one plain line.
Shared by every runtime (PyTorch, ONNX Runtime, TensorRT) so that they all refuse the same inputs."""
from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from ..types import GroundingError


class SamShapes:
    """The tensor shapes a SAM model's encoder and decoder take, and checks with clear errors."""

    def __init__(self, sam: Sam) -> None:
        pe = sam.prompt_encoder
        self.image_size = sam.image_encoder.img_size
        self.embed_dim = pe.embed_dim
        self.embedding_hw = tuple(pe.image_embedding_size)
        self.mask_hw = tuple(pe.mask_input_size)

    def check_image(self, image: torch.Tensor) -> None:
        expected = (1, 3, self.image_size, self.image_size)
        if tuple(image.shape) != expected:
            raise GroundingError(f"SAM encoder input must be {expected} (resized, normalised, padded), "
                                 f"got {tuple(image.shape)}")

    def check_decoder_inputs(self, image_embeddings, mask_input, box, text_tokens) -> None:
        expected = {"image_embeddings": (1, self.embed_dim, *self.embedding_hw),
                    "mask_input": (1, 1, *self.mask_hw), "box": (1, 4)}
        for name, tensor in zip(expected, (image_embeddings, mask_input, box)):
            if tuple(tensor.shape) != expected[name]:
                raise GroundingError(f"SAM decoder input {name} must be {expected[name]}, got {tuple(tensor.shape)}")
        if text_tokens.ndim != 3 or text_tokens.shape[0] != 1 or text_tokens.shape[2] != self.embed_dim \
                or text_tokens.shape[1] < 1:
            raise GroundingError(f"SAM decoder text_tokens must be (1, T >= 1, {self.embed_dim}), "
                                 f"got {tuple(text_tokens.shape)}")
