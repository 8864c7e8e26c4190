"""The trainers' shared toolkit (grounding/training/loop.py): schedule, AdamW, optimizer state, atomic writes."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flmm_ros.grounding.training.loop import (ResumeError, WarmupCosine, adamw, load_optimizer_state,
                                              save_optimizer_state, set_lr, tensor_file, text_file, warmup_cosine,
                                              write_atomically)


def test_warmup_then_cosine_schedule():
    f = warmup_cosine(100, warmup_ratio=0.1)
    assert f(0) == pytest.approx(1e-5) and f(5) == pytest.approx(0.5, abs=1e-4)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_tabletop_schedule_counts_warmup_steps_from_one_and_decays_to_its_floor():
    """The tabletop trainers' rule: the k-th warm-up step gets k / warmup, the end is `floor` of the peak."""
    f = WarmupCosine(total=20, warmup=4, floor=0.02)
    assert [f(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert f(12) == pytest.approx(0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(20) == pytest.approx(0.02) and f(25) == pytest.approx(0.02)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_adamw_keeps_norms_and_biases_out_of_weight_decay_when_asked():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    one = adamw(model.parameters(), 1e-3, 0.05)
    assert len(one.param_groups) == 1 and one.param_groups[0]["weight_decay"] == 0.05
    two = adamw(model.parameters(), 1e-3, 0.05, betas=(0.9, 0.98), decay_1d=False)
    decay, no_decay = two.param_groups
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.05
    assert [p.ndim for p in no_decay["params"]] == [1, 1, 1] and no_decay["weight_decay"] == 0.0
    assert two.defaults["betas"] == (0.9, 0.98)
    set_lr(two, 0.5)
    assert [g["lr"] for g in two.param_groups] == [0.5, 0.5]


def _steps(model, optimizer, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = model(torch.randn(5, 3, generator=generator)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    """Saved, reloaded into a fresh optimizer, the run goes on exactly as an uninterrupted one."""
    straight = _model()
    opt = adamw(straight.parameters(), 1e-2, 0.05, decay_1d=False)
    _steps(straight, opt, 3)
    path = tmp_path / "optimizer.safetensors"
    save_optimizer_state(path, opt, {"step": 3, "log": [{"loss": 0.5}]})
    _steps(straight, opt, 2, seed=1)

    fresh = _model()
    opt_fresh = adamw(fresh.parameters(), 1e-2, 0.05, decay_1d=False)
    _steps(fresh, opt_fresh, 3)                     # same weights as `straight` at step 3
    restarted = adamw(fresh.parameters(), 1e-2, 0.05, decay_1d=False)
    assert load_optimizer_state(path, restarted) == {"step": 3, "log": [{"loss": 0.5}]}
    _steps(fresh, restarted, 2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), fresh.parameters()))
    with safe_open(str(path), "pt") as f:                # plain safetensors: tensors + JSON header, no pickle
        assert set(f.keys()) >= {"0.exp_avg", "0.exp_avg_sq", "0.step"}
        assert len(json.loads(f.metadata()["param_groups"])) == 2


def test_optimizer_state_without_a_header_still_loads(tmp_path):
    """The SAM pre-training's files from before the toolkit: tensors only, the groups from the optimizer."""
    model = _model()
    opt = adamw(model.parameters(), 1e-2, 0.05, decay_1d=False)
    _steps(model, opt, 2)
    tensors = {f"{i}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    save_file(tensors, str(tmp_path / "old.safetensors"))
    other = adamw(_model().parameters(), 1e-2, 0.05, decay_1d=False)
    assert load_optimizer_state(tmp_path / "old.safetensors", other) == {}
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_optimizer_state_of_other_parameters_is_refused(tmp_path):
    model = _model()
    opt = adamw(model.parameters(), 1e-2, 0.05)
    _steps(model, opt, 1)
    save_optimizer_state(tmp_path / "o.safetensors", opt)
    with pytest.raises(ResumeError, match=r"other parameters \(groups of \[4\] tensors, this run has \[1, 3\]\)"):
        load_optimizer_state(tmp_path / "o.safetensors", adamw(_model().parameters(), 1e-2, 0.05, decay_1d=False))
    with pytest.raises(ResumeError, match="missing"):
        load_optimizer_state(tmp_path / "none.safetensors", opt)


def test_an_interrupted_write_leaves_every_previous_file_whole(tmp_path):
    weights, state = tmp_path / "model.safetensors", tmp_path / "state.json"
    write_atomically({weights: tensor_file({"w": torch.ones(3)}), state: text_file('{"step": 1}')})

    def crash(path):
        path.write_text("half a fil")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):   # the second file fails: the first one is not renamed either
        write_atomically({weights: tensor_file({"w": torch.zeros(3)}), state: crash})
    assert torch.equal(load_file(str(weights))["w"], torch.ones(3))
    assert json.loads(state.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "state.json"]   # no .partial left
    write_atomically({weights: tensor_file({"w": torch.zeros(3)}), state: text_file('{"step": 2}')})
    assert torch.equal(load_file(str(weights))["w"], torch.zeros(3)) and json.loads(state.read_text())["step"] == 2
