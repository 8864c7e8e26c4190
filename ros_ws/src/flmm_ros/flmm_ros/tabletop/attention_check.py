"""Does the LMM look at an object when it reads its name? (what F-LMM's mask head will rely on)

For each held-out object with a referring expression, the F-LMM grounding sequence
`USER: <image>\\nPlease give me a description of the image. ASSISTANT: {expression}` is run once,
reading the phrase rows with the product's extraction (`grounding/attention.py`, equal to eager). The phrase tokens' attention to the image tokens, per layer and head, is averaged
over the phrase tokens and normalised over the image (F-LMM's input maps). Reported:
- lift: attention mass on the object's patches divided by the share of patches the object covers
  (1 = no better than uniform), for the mean over all layers and heads and for the best head;
- pointing: how often the argmax patch of the mean map lies on the object, and the same for the best head;
- kind share: where another object has the same colour but another kind, the object's share of the
  attention on the two (0.5 = the attention cannot tell them apart; ~patch-area share when it ignores
  kind), for the mean map and the best head; colour share: the same against same-kind objects of
  another colour. Together they say whether the phrase finds its object by kind, by colour, or both.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..grounding.attention import capture_phrase_attention, enable_phrase_attention
from .language import DESCRIBE_PROMPT
from .patch_probe import MIN_COVER, patch_coverage
from .scenes import generate_scene, split_seeds
from .tokenizer import IMAGE, format_prompt


def phrase_attention(model: LlavaForConditionalGeneration, processor: LlavaProcessor, image: np.ndarray,
                     phrase: str) -> torch.Tensor:
    """(layers*heads, image_tokens) attention of the phrase tokens to the image, each map summing to 1."""
    prompt = processor(text=format_prompt(DESCRIBE_PROMPT), images=image, return_tensors="pt")
    phrase_ids = processor.tokenizer(phrase, add_special_tokens=False, return_tensors="pt").input_ids
    input_ids = torch.cat([prompt.input_ids, phrase_ids], 1)
    image_cols = (input_ids[0] == processor.tokenizer.convert_tokens_to_ids(IMAGE)).nonzero().squeeze(1)
    rows = torch.arange(prompt.input_ids.shape[1], input_ids.shape[1])
    enable_phrase_attention(model)
    with torch.no_grad(), capture_phrase_attention([rows], image_cols) as capture:
        model(input_ids=input_ids, pixel_values=prompt.pixel_values, use_cache=False)
    maps = capture.maps()[0]                                   # (L*H, image tokens), channel = l*H + h
    return maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)


def attention_report(model: LlavaForConditionalGeneration, processor: LlavaProcessor, scenes: int = 40,
                     split: str = "val") -> dict[str, float]:
    grid = int(round(model.config.image_seq_length ** 0.5))
    lifts, hits = [], []
    shares = {"kind": [], "colour": []}
    for seed in split_seeds(split, scenes):
        scene = generate_scene(seed, (480, 640) if seed % 2 else (256, 256))
        for obj in scene.objects:
            if not obj.expressions:
                continue
            cover = torch.from_numpy(patch_coverage(obj.mask, grid)).float()
            on_object = cover >= MIN_COVER
            if not on_object.any():
                continue
            maps = phrase_attention(model, processor, scene.image, obj.expressions[0])
            maps = torch.cat([maps, maps.mean(0, keepdim=True)])       # last row: mean of all heads
            lifts.append((maps[:, on_object].sum(-1) / on_object.float().mean()).numpy())
            hits.append(on_object[maps.argmax(-1)].numpy())
            on_target = maps @ cover
            for test, others in (("kind", [o for o in scene.objects if o.colour == obj.colour and o.kind != obj.kind]),
                                 ("colour", [o for o in scene.objects if o.kind == obj.kind and o.colour != obj.colour])):
                if others:
                    on_others = maps @ torch.from_numpy(sum(patch_coverage(o.mask, grid) for o in others)).float()
                    shares[test].append((on_target / (on_target + on_others).clamp_min(1e-12)).numpy())
    lifts, hits = np.stack(lifts), np.stack(hits).astype(float)
    best = int(hits[:, :-1].mean(0).argmax())
    heads = model.config.text_config.num_attention_heads
    report = {"objects": len(lifts), "lift_mean_map": float(lifts[:, -1].mean()),
              "pointing_mean_map": float(hits[:, -1].mean()), "best_head": f"layer {best // heads} head {best % heads}",
              "lift_best_head": float(lifts[:, best].mean()), "pointing_best_head": float(hits[:, best].mean())}
    for test, values in shares.items():
        if values:
            values = np.stack(values)
            report[f"{test}_tests"] = len(values)
            report[f"{test}_share_mean_map"] = float(values[:, -1].mean())
            report[f"{test}_share_best_head"] = float(values[:, :-1].mean(0).max())
    return report
