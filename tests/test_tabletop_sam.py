"""tabletop-tiny's SAM refiner training: prompts, targets, learning, checkpoints (tiny models, CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flmm_ros.grounding.checkpoint import load_sam_weights
from flmm_ros.grounding.sam.models import TINY_TEST_SAM, SamArch, build_sam
from flmm_ros.grounding.sam.prompts import SamPromptGeometry
from flmm_ros.grounding.training.loop import ResumeError, adamw, parse_trainer_args
from flmm_ros.tabletop import train_sam
from flmm_ros.tabletop.sam_eval import binary_iou, evaluate_saved, scenes_fingerprint
from flmm_ros.tabletop.sam_model import (KIND_FILE, LOG_FILE, SAM_FILE, TABLETOP_SAM, KindPrompts, decode,
                                         load_tabletop_sam, save_tabletop_sam)
from flmm_ros.tabletop.sam_prompt_sampling import confusable_masks, jitter_box, sample_prompts, simulate_coarse_logits
from flmm_ros.tabletop.scenes import generate_scene, split_seeds
from flmm_ros.tabletop.shapes import KINDS
from flmm_ros.tabletop.train_sam import SamTrainConfig, cell_kinds, low_res_targets, training_loss


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scenes(count: int, sizes=((256, 256), (480, 640))):
    scenes = [generate_scene(seed, sizes[i % len(sizes)]) for i, seed in enumerate(split_seeds("train", 40))]
    return [s for s in scenes if s.objects][:count]


def test_box_prompts_stay_in_the_image_and_near_the_object():
    rng = np.random.default_rng(0)
    for scene in _scenes(6):
        h, w = scene.image.shape[:2]
        sample = sample_prompts(scene, rng)
        assert sample.boxes.shape == (len(scene.objects), 4)
        x0, y0, x1, y1 = sample.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= w).all() and (y1 <= h).all()
        assert (x1 > x0).all() and (y1 > y0).all()
        truth = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)
        jittered = torch.from_numpy(sample.boxes)
        lt, rb = torch.maximum(truth[:, :2], jittered[:, :2]), torch.minimum(truth[:, 2:], jittered[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        area = lambda b: (b[:, 2:] - b[:, :2]).prod(1)  # noqa: E731
        assert (inter / (area(truth) + area(jittered) - inter) > 0.4).all()
    box = (10, 20, 50, 80)
    assert jitter_box(box, (100, 100), rng, scale=0.0).tolist() == [10, 20, 50, 80]


def test_clicks_fall_on_the_right_side_of_the_mask():
    rng = np.random.default_rng(1)
    negatives = 0
    for scene in _scenes(8):
        sample = sample_prompts(scene, rng)
        h, w = scene.image.shape[:2]
        for mask, coords, labels in zip(sample.masks, sample.points, sample.point_labels):
            assert labels[0] == 1, "the first click is always on the object"
            xs, ys = coords[:, 0].astype(int), coords[:, 1].astype(int)
            assert ((xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)).all()
            assert (mask[ys, xs] == (labels == 1)).all()
            negatives += int((labels == 0).sum())
    assert negatives > 0, "some clicks should be negative"


def test_coarse_maps_resemble_their_objects_at_a_low_resolution():
    rng = np.random.default_rng(2)
    ious = []
    for scene in _scenes(8):
        masks = np.stack([o.mask for o in scene.objects])
        coarse = simulate_coarse_logits(masks, rng)
        h, w = scene.image.shape[:2]
        assert coarse.ndim == 3 and coarse.shape[0] == len(masks)
        assert 16 <= max(coarse.shape[1:]) <= 64
        assert abs(coarse.shape[2] / coarse.shape[1] - w / h) < 0.2   # the image's aspect ratio
        up = torch.nn.functional.interpolate(coarse[:, None], size=(h, w), mode="bilinear")[:, 0] > 0
        ious += binary_iou(up, torch.from_numpy(masks)).tolist()
    # Rough guesses: mostly on the object, but far from exact (that is the refiner's job).
    assert 0.25 < float(np.mean(ious)) < 0.8


def test_confusable_masks_join_objects_of_other_kinds_only():
    rng = np.random.default_rng(4)
    joined = 0
    for scene in _scenes(30):
        own = np.stack([o.mask for o in scene.objects])
        assert np.array_equal(confusable_masks(scene, rng, prob=0.0), own)
        confused = confusable_masks(scene, rng, prob=1.0)
        for obj, mask in zip(scene.objects, confused):
            assert (mask >= obj.mask).all()
            others = [x for x in scene.objects if x.kind != obj.kind]
            added = [x for x in others if (mask & x.mask & ~obj.mask).any()]
            # Every object of another kind that the map covers is covered whole; none of the same kind is.
            assert np.array_equal(mask, np.logical_or.reduce([obj.mask] + [x.mask for x in added]))
            assert bool(added) == bool(others)
            joined += len(added)
    assert joined > 0


def test_kind_tokens_are_one_per_kind_and_steer_the_decoder():
    torch.manual_seed(0)
    sam = _randomised(TINY_TEST_SAM, 1).eval()
    kind_prompts = KindPrompts(sam.prompt_encoder.embed_dim)
    tokens = kind_prompts(["mug", "ball", "mug"])
    assert tokens.shape == (3, 1, sam.prompt_encoder.embed_dim)
    assert torch.equal(tokens[0], tokens[2]) and not torch.equal(tokens[0], tokens[1])
    with pytest.raises(ValueError, match="unknown kind 'spoon'"):
        kind_prompts(["spoon"])
    x, _ = SamPromptGeometry(sam).preprocess(_scenes(1)[0].image)
    with torch.no_grad():
        embedding = sam.image_encoder(x)
        boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0]] * 2)
        plain, _ = decode(sam, embedding, boxes=boxes)
        with_kind, _ = decode(sam, embedding, boxes=boxes, tokens=kind_prompts(["mug", "ball"]))
    assert not torch.allclose(plain, with_kind)
    assert not torch.allclose(with_kind[0], with_kind[1])   # same box, other kind: another mask


def test_cell_kinds_label_each_embedding_cell_with_the_kind_covering_it():
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, :4, :4] = 1.0      # a ball filling the top-left 2x2 cells of a 4x4 grid
    target[1, 0, 4:, 6:] = 1.0      # a mug over the right half of the bottom-right cells
    target[1, 0, 0, 7] = 1.0        # one stray pixel: under 30 % of its cell
    labels = cell_kinds(target, ["ball", "mug"], (4, 4))
    expected = torch.zeros(4, 4, dtype=torch.long)
    expected[:2, :2] = KINDS.index("ball") + 1
    expected[2:, 3] = KINDS.index("mug") + 1
    assert torch.equal(labels, expected)


def test_low_res_targets_map_back_onto_the_image_like_sam_outputs():
    """Targets live in the decoder's frame: SAM's own postprocessing brings them back onto the object."""
    sam = build_sam(TINY_TEST_SAM)
    prompts = SamPromptGeometry(sam)
    for scene in _scenes(2):
        _, input_hw = prompts.preprocess(scene.image)
        masks = np.stack([o.mask for o in scene.objects])
        targets = low_res_targets(masks, prompts, input_hw)
        assert targets.shape[-2:] == sam.prompt_encoder.mask_input_size
        logits = 20 * (targets - 0.5)
        back = sam.postprocess_masks(logits, input_hw, scene.image.shape[:2])[:, 0] > 0
        assert binary_iou(back, torch.from_numpy(masks)).min() > 0.8


def test_a_few_steps_on_two_scenes_reduce_the_loss():
    torch.manual_seed(0)
    sam = build_sam(TINY_TEST_SAM).train()
    prompts = SamPromptGeometry(sam)
    rng = np.random.default_rng(3)
    samples = [sample_prompts(scene, rng) for scene in _scenes(2, sizes=((128, 128), (96, 128)))]
    kind_prompts = KindPrompts(sam.prompt_encoder.embed_dim)
    optimizer = adamw(torch.nn.ModuleList([sam, kind_prompts]).parameters(), 3e-3, 0.0, decay_1d=False)
    with torch.no_grad():
        before, _ = training_loss(sam, kind_prompts, prompts, samples)
    for _ in range(8):
        loss, parts = training_loss(sam, kind_prompts, prompts, samples)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after, _ = training_loss(sam, kind_prompts, prompts, samples)
    assert parts["prompts"] == 4 * sum(len(s.masks) for s in samples)   # coarse + box, box, clicks, + kind
    assert parts["kind_probe"] > 0
    assert after.item() < 0.85 * before.item()


def _randomised(arch: SamArch, seed: int):
    """A model whose every tensor is random (fresh SAMs have zero positional embeddings)."""
    sam = build_sam(arch)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in sam.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return sam


def test_saved_tabletop_sam_reloads_exactly(tmp_path):
    sam = _randomised(TABLETOP_SAM, 0)
    save_tabletop_sam(sam, TABLETOP_SAM, tmp_path)
    reloaded = load_tabletop_sam(tmp_path)
    expected, got = sam.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.", "pixel_")) for k in got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # The product loader reads the same file into a model built from the constant.
    other = build_sam(TABLETOP_SAM)
    report = load_sam_weights(other, tmp_path / SAM_FILE)
    assert not report.missing and not report.unexpected and not report.shape_mismatches
    assert torch.equal(other.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
                       sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)


def _config(*argv) -> SamTrainConfig:
    """The run the command line describes (train_sam's own parser)."""
    config, args = parse_trainer_args(list(argv), "", SamTrainConfig, train_sam.HELP)
    assert not args.eval
    return config


def test_training_writes_the_model_and_resumes_reproducibly(tmp_path):
    common = ["--eval-scenes", "2", "--log-every", "1", "--eval-every", "1", "--save-every", "1", "--warmup", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_sam.train(_config("--out", str(straight), "--steps", "3", *common), arch=TINY_TEST_SAM)
    train_sam.train(_config("--out", str(resumed), "--steps", "2", *common), arch=TINY_TEST_SAM)
    train_sam.train(_config("--out", str(resumed), "--steps", "3", *common), arch=TINY_TEST_SAM)

    a, b = load_tabletop_sam(straight).state_dict(), load_tabletop_sam(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must end with the same weights"
    kinds_a, kinds_b = (load_file(d / KIND_FILE)["table.weight"] for d in (straight, resumed))
    assert kinds_a.shape[0] == len(KINDS) and torch.equal(kinds_a, kinds_b)
    assert not all(torch.equal(a[k], v) for k, v in build_sam(TINY_TEST_SAM).state_dict().items())
    log = json.loads((straight / LOG_FILE).read_text())
    assert log["arch"] == TINY_TEST_SAM.to_dict() and log["steps"] == 3
    assert [r["step"] for r in log["history"]] == [1, 2, 3]
    names = ("box_miou", "coarse_box_miou", "coarse_input_miou", "confused_box_miou", "confused_kind_miou")
    assert set(log["val"]) >= set(names)
    assert all(0.0 <= log["val"][k] <= 1.0 for k in names)
    assert log["scenes"] == scenes_fingerprint()
    # --eval measures the saved model (and its kind prompts) the same way.
    assert set(evaluate_saved(straight, "val", 2)) == set(log["val"])


def test_a_checkpoint_from_other_scenes_is_not_resumed(tmp_path):
    args = ["--out", str(tmp_path), "--eval-scenes", "1", "--save-every", "1", "--warmup", "1"]
    train_sam.train(_config(*args, "--steps", "1"), arch=TINY_TEST_SAM)
    state_path = tmp_path / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["scenes"] = "0" * 16   # as if the scene generator had changed since
    state_path.write_text(json.dumps(state))
    with pytest.raises(ResumeError, match="other scenes"):
        train_sam.train(_config(*args, "--steps", "2"), arch=TINY_TEST_SAM)
    with pytest.raises(SystemExit, match="^error: .* other scenes .* --restart"):    # the command line: one line
        train_sam.main([*args, "--steps", "2"])


def test_a_checkpoint_without_kind_prompts_is_not_resumed(tmp_path):
    args = ["--out", str(tmp_path), "--eval-scenes", "1", "--save-every", "1", "--warmup", "1"]
    train_sam.train(_config(*args, "--steps", "1"), arch=TINY_TEST_SAM)
    (tmp_path / "checkpoint" / KIND_FILE).unlink()   # as if trained before kind prompts existed
    with pytest.raises(ResumeError, match="before kind prompts"):
        train_sam.train(_config(*args, "--steps", "2"), arch=TINY_TEST_SAM)


def test_a_checkpoint_from_before_the_shared_toolkit_still_resumes(tmp_path):
    """Its optimizer file held the tensors only (no header); the run goes on from it."""
    args = ["--out", str(tmp_path), "--eval-scenes", "1", "--save-every", "1", "--warmup", "1", "--log-every", "1"]
    train_sam.train(_config(*args, "--steps", "1"), arch=TINY_TEST_SAM)
    optimizer_file = tmp_path / "checkpoint" / "optimizer.safetensors"
    save_file(load_file(optimizer_file), str(optimizer_file))          # as the trainer wrote it before
    train_sam.train(_config(*args, "--steps", "2"), arch=TINY_TEST_SAM)
    log = json.loads((tmp_path / LOG_FILE).read_text())
    assert [r["step"] for r in log["history"]] == [1, 2]
    assert not list(tmp_path.rglob("*.partial"))
