"""Training/evaluation tools for the grounding head (tiny random LMM + tiny SAM, generated scenes)."""
import json
import math

import numpy as np
import pytest
import torch

from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.grounding.training.data import encode_sample
from flmm_ros.grounding.training.evaluate import evaluate, whole_image_baseline
from flmm_ros.grounding.training.loop import adamw, load_optimizer_state
from flmm_ros.grounding.training.losses import bce_loss, dice_loss, mask_losses
from flmm_ros.grounding.training.metrics import IoUMeter
from flmm_ros.grounding.training.train import (RECIPES, HeadTrainConfig, batch_loss, build_training_pipeline, train,
                                               trainable_parameters)
from flmm_ros.tabletop.samples import tabletop_samples


def test_dice_and_bce_match_their_formulas():
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    p = logits.sigmoid()
    expected_dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert torch.isclose(dice_loss(logits, target), expected_dice)
    expected_bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert torch.isclose(bce_loss(logits, target), expected_bce)
    losses = mask_losses(logits[:, :1, :1], logits, target)
    assert set(losses) == {"loss_mask", "loss_dice", "sam_loss_mask", "sam_loss_dice"}


def test_iou_meter_ciou_and_giou():
    m = IoUMeter()
    a = np.zeros((4, 4), bool)
    a[:2] = True                     # 8 px
    b = np.zeros((4, 4), bool)
    b[:1] = True                     # 4 px, inside a
    assert m.add(b, a) == 0.5
    assert m.add(a, a) == 1.0
    assert m.ciou == pytest.approx((4 + 8) / (8 + 8)) and m.giou == pytest.approx(0.75)


def test_empty_prediction_on_empty_ground_truth_scores_zero_like_mmdet():
    """mmdet RefSegMetric: iou = nan_to_num(0 / 0) = 0 for that object (it still counts in the mean)."""
    m = IoUMeter()
    empty = np.zeros((4, 4), bool)
    assert m.add(empty, empty) == 0.0
    m.add(np.ones((4, 4), bool), np.ones((4, 4), bool))
    assert m.giou == pytest.approx(0.5) and m.ciou == pytest.approx(1.0) and m.count == 2


def test_flmm_targets_go_through_the_lmm_resolution_first():
    """F-LMM: GT nearest-resized to the LMM's resized image ('masks'), then to each prediction's size."""
    target = torch.zeros(1, 64, 96)
    target[0, 20:40, 31] = 1                      # a 1 px line: lost at 21x32, so the refined target loses it too
    target[0, 40:60, 48:90] = 1
    coarse, refined = torch.randn(1, 14, 21), torch.randn(1, 64, 96)
    lmm_hw = (21, 32)
    via_lmm = torch.nn.functional.interpolate(target[None], size=lmm_hw)[0]
    small = torch.nn.functional.interpolate(via_lmm[None], size=(14, 21))[0]
    full = torch.nn.functional.interpolate(via_lmm[None], size=(64, 96))[0]
    assert not torch.equal(full, target)
    losses = mask_losses(coarse, refined, target, lmm_hw)
    assert losses["sam_loss_mask"] == pytest.approx(bce_loss(refined, full).item())
    assert losses["sam_loss_dice"] == pytest.approx(dice_loss(refined, full).item())
    assert losses["loss_dice"] == pytest.approx(dice_loss(coarse, small).item())
    assert mask_losses(coarse, refined, target)["sam_loss_mask"] == pytest.approx(bce_loss(refined, target).item())


def test_flmm_recipe_is_the_documented_default_for_refcoco():
    flmm, tabletop = RECIPES["flmm"], RECIPES["tabletop"]
    assert (flmm.epochs, flmm.batch_size, flmm.lr, flmm.amp, flmm.targets, flmm.loss_average) == \
        (8, 8, 1e-4, "bfloat16", "lmm", "sample")
    assert (tabletop.epochs, tabletop.batch_size, tabletop.amp, tabletop.targets, tabletop.loss_average) == \
        (2, 4, None, "image", "mask")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    bundle = write_random_bundle(tmp_path_factory.mktemp("bundle"))
    return build_training_pipeline(str(bundle))


def small_samples(split, count):
    return list(tabletop_samples(split, count, sizes=((64, 64), (64, 96))))


def foreground_contrast(pipe, sample) -> dict[str, float]:
    """Mean predicted probability inside the ground truth minus outside, per output."""
    with torch.no_grad():
        logits = pipe.head_logits(sample.phrase_pass(), sample.prepared, sample.sam_encoding())
    target = sample.masks()
    coarse_target = torch.nn.functional.interpolate(target[:, None], size=logits.coarse.shape[-2:])[:, 0] > 0.5
    out = {}
    for name, value, t in (("coarse", logits.coarse, coarse_target), ("refined", logits.refined, target > 0.5)):
        p = value.sigmoid()
        out[name] = (p[t].mean() - p[~t].mean()).item()
    return out


def test_training_learns_and_only_touches_the_head(pipe, tmp_path):
    torch.manual_seed(0)
    cache = [encode_sample(pipe, s) for s in small_samples("train", 1)]
    frozen = {n: p.clone() for n, p in pipe.lmm.model.named_parameters()}
    encoder = {n: p.clone() for n, p in pipe.head.sam.image_encoder.named_parameters()}
    head_before = {n: p.clone() for n, p in pipe.head.mask_head.named_parameters()}
    before = foreground_contrast(pipe, cache[0])
    train(pipe, cache, cache, tmp_path,
          HeadTrainConfig(epochs=60, batch_size=1, lr=3e-3, eval_every=10, save_every=1000))
    log = json.loads((tmp_path / "train_log.json").read_text())
    after = foreground_contrast(pipe, cache[0])
    # Overfitting one scene: the loss falls and the masks move towards the objects.
    assert log[-1]["loss"] < 0.9 * log[0]["loss"]
    assert after["coarse"] > before["coarse"] + 0.05 and after["refined"] > before["refined"]
    assert all(torch.equal(p, frozen[n]) for n, p in pipe.lmm.model.named_parameters())
    assert all(torch.equal(p, encoder[n]) for n, p in pipe.head.sam.image_encoder.named_parameters())
    assert any(not torch.equal(p, head_before[n]) for n, p in pipe.head.mask_head.named_parameters())
    assert (tmp_path / "head.safetensors").is_file() and (tmp_path / "train_log.json").is_file()


def test_training_resumes_from_its_checkpoint(pipe, tmp_path):
    cache = [encode_sample(pipe, s) for s in small_samples("train", 2)]
    train(pipe, cache, cache[:1], tmp_path, HeadTrainConfig(epochs=2, batch_size=1, save_every=1, eval_every=100))
    optimizer = adamw(trainable_parameters(pipe.head), 1e-4, 0.01)
    state = load_optimizer_state(tmp_path / "trainer_state.safetensors", optimizer)
    assert state["step"] == 4 and len(optimizer.state) > 0
    final = train(pipe, cache, cache[:1], tmp_path, HeadTrainConfig(epochs=3, batch_size=1, save_every=1,
                                                                     eval_every=100))
    assert final["step"] == 6 and math.isfinite(final["loss"])


def test_flmm_recipe_averages_samples_and_trains_in_bf16(pipe, tmp_path):
    """8 GPUs x 1 sample, gradients averaged: the batch loss is the mean of each sample's own mask-mean loss."""
    cache = [encode_sample(pipe, s) for s in small_samples("train", 2)]
    with torch.no_grad():
        each = [batch_loss(pipe, [c], targets="lmm") for c in cache]
        assert batch_loss(pipe, cache, targets="lmm", loss_average="sample") == pytest.approx((each[0] + each[1]) / 2)
        masks = [c.masks().shape[0] for c in cache]
        assert masks[0] != masks[1]                  # so the two averages differ
        weighted = (each[0] * masks[0] + each[1] * masks[1]) / sum(masks)
        assert batch_loss(pipe, cache, targets="lmm") == pytest.approx(weighted)
    final = train(pipe, cache, cache[:1], tmp_path, HeadTrainConfig(epochs=1, batch_size=2, eval_every=100,
                                                                     save_every=100, amp="bfloat16", targets="lmm",
                                                                     loss_average="sample"))
    assert final["step"] == 1 and math.isfinite(final["loss"])


def test_end_to_end_evaluation_and_baseline(pipe):
    samples = small_samples("val", 2)
    scores = evaluate(pipe, samples)
    n = sum(len(s.masks) for s in samples)
    assert scores["coarse"]["count"] == n and scores["refined"]["count"] == n
    base = whole_image_baseline(samples)["whole_image"]
    total_gt = sum(m.sum() for s in samples for m in s.masks)
    total_px = sum(m.size for s in samples for m in s.masks)
    assert base["ciou"] == pytest.approx(total_gt / total_px)

    # By case: every phrase is scored once more, in its case's group, and the groups add up.
    by_case = evaluate(pipe, samples, by_case=True)
    cases = [c for s in samples for c in s.cases]
    for name in ("coarse", "refined"):
        groups = {k: v for k, v in by_case.items() if k.startswith(f"{name} | ")}
        assert {k.split(" | ")[1] for k in groups} == set(cases)
        assert sum(g["count"] for g in groups.values()) == by_case[name]["count"] == n
        assert by_case[name]["ciou"] == pytest.approx(scores[name]["ciou"])


def test_refcoco_format_data_feeds_the_trainer(tmp_path):
    from flmm_ros.grounding.training.data import refcoco_samples
    from flmm_ros.tabletop.refcoco_format import export_refcoco_format
    from flmm_ros.tabletop.scenes import generate_scene, split_seeds

    seeds = list(split_seeds("val", 2))
    export_refcoco_format(tmp_path, seeds, size=(64, 96))
    samples = list(refcoco_samples(tmp_path, "val"))
    assert len(samples) == 2
    scene = generate_scene(seeds[0], size=(64, 96))
    first = samples[0]
    assert first.image.shape == (64, 96, 3) and len(first.phrases) == len(first.masks) > 0
    expected = {e: m for e, m in scene.referring_pairs()}
    for phrase, mask in zip(first.phrases, first.masks):
        assert (mask == expected[phrase]).all()
