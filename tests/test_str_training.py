"""STR reference training: recipes, model conversion, optimiser groups, seeded digits runs,
bit-identical resume (with the target-sparsity controller), the target-sparsity controller on
digits, a 2-process DDP run and the sweep example."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch
from _helpers import init_ddp_worker, run_ddp_workers
from torch import nn

from subkern.methods.str import (
    DATA_DEFAULTS,
    PAPER_RECIPES,
    STRRecipe,
    TargetSparsity,
    make_model,
    make_optimizer,
    model_sparsity,
    ramp_schedule,
    steps_per_epoch,
    str_layers,
    train_str,
)
from subkern.nn.str import STRConv2d, STRLinear
from subkern.training import CheckpointError, DistInfo, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quiet(_msg: str) -> None:
    return None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest (and immune to a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(tmp_path=None, **kwargs):
    recipe = STRRecipe(progress=False, device="cpu", **kwargs,
                       out=None if tmp_path is None else str(tmp_path))
    return train_str(recipe, info=DistInfo(), log=_quiet)


# ---------------------------------------------------------------------------------------------
# recipes, models, optimiser
# ---------------------------------------------------------------------------------------------


def test_paper_recipes_are_the_official_configs():
    r50 = STRRecipe.paper("imagenet_resnet50", data="digits")
    assert (r50.model, r50.lr, r50.batch_size, r50.momentum, r50.nesterov) == \
        ("resnet50", 0.256, 256, 0.875, False)
    assert (r50.num_epochs, r50.warmup_epochs, r50.label_smoothing) == (100, 5, 0.1)
    assert r50.s_init_value == -3200.0 and r50.weight_decay_value == pytest.approx(2.2518e-5,
                                                                                    rel=1e-4)
    assert r50.threshold_decay_value == r50.weight_decay_value and r50.bn_decay   # s, BN decay
    assert PAPER_RECIPES["imagenet_resnet50_dense"]["weight_decay"] == 2.0 ** -15
    cifar = STRRecipe.paper("cifar10_cresnet18")
    assert (cifar.data, cifar.s_init_value, cifar.weight_decay_value) == ("cifar10", -100.0, 5e-4)
    assert cifar.use_augment
    digits = STRRecipe()
    assert digits.num_epochs == DATA_DEFAULTS["digits"]["epochs"]
    assert digits.identity()["s_init"] == DATA_DEFAULTS["digits"]["s_init"]
    with pytest.raises(ValueError, match="paper recipe"):
        STRRecipe.paper("nope")


@pytest.mark.parametrize("kwargs,match", [
    ({"data": "svhn"}, "data set"), ({"model": "vgg"}, "model"), ({"epochs": 0}, "epochs"),
    ({"lr": 0.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"target_sparsity": 1.0}, "target_sparsity"), ({"momentum": 1.0}, "momentum"),
    ({"target_sparsity": 0.5, "dense_baseline": True}, "exclude"),
    ({"target_ramp": 2.0}, "target_ramp"), ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"stop_after": 1}, "stop_after"), ({"s_init": math.nan}, "s_init")])
def test_recipe_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        STRRecipe(**kwargs)


def test_models_get_str_layers_and_dense_first_last_options():
    torch.manual_seed(0)
    model = make_model(STRRecipe(model="conv2", width_mult=0.125), (1, 8, 8), 10)
    layers = str_layers(model)
    assert len(layers) == 5 and sum(isinstance(m, STRConv2d) for m in layers) == 2
    assert all(float(m.s.detach()) == DATA_DEFAULTS["digits"]["s_init"] for m in layers)
    assert all(m.bias is None for m in layers)                       # official: no biases
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) is False   # conv2
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    fc = make_model(STRRecipe(first_layer_dense=True, last_layer_dense=True, per_channel=True,
                              s_init=-7.0), (1, 8, 8), 10)
    kinds = [type(m) for m in fc.linear if isinstance(m, nn.Linear)]
    assert kinds == [nn.Linear, STRLinear, nn.Linear]
    assert fc.linear[2].s.shape == (100,) and float(fc.linear[2].s[0].detach()) == -7.0
    dense = make_model(STRRecipe(dense_baseline=True), (1, 8, 8), 10)
    assert not str_layers(dense)


def test_optimizer_has_the_official_three_groups():
    recipe = STRRecipe(model="cresnet18", width_mult=0.125, weight_decay=1e-3,
                       threshold_decay=2e-3, bn_decay=False, nesterov=True)
    model = make_model(recipe, (1, 8, 8), 10)
    opt = make_optimizer(model, recipe)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"bn", "thresholds", "weights"}
    assert {id(p) for p in groups["thresholds"]["params"]} == {id(m.s) for m in str_layers(model)}
    assert groups["thresholds"]["weight_decay"] == 2e-3
    assert groups["bn"]["weight_decay"] == 0.0 and groups["weights"]["weight_decay"] == 1e-3
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    shared = make_optimizer(model, STRRecipe(weight_decay=1e-3))
    assert {g["name"]: g["weight_decay"] for g in shared.param_groups} == \
        {"bn": 1e-3, "thresholds": 1e-3, "weights": 1e-3}


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def test_digits_run_is_seeded_sparse_and_writes_results(tmp_path):
    first = _run(tmp_path, epochs=2, seed=3, weight_decay=3e-2)
    assert first["test_acc"] > 0.8                          # chance is 0.1
    assert 0.05 < first["sparsity"] < 1.0
    assert first["sparsity"] == pytest.approx(model_sparsity(first["model"]))
    assert first["overall_sparsity"] == pytest.approx(first["sparsity"])   # every layer is STR
    assert first["budget"]["totals"]["params"] == 64 * 300 + 300 * 100 + 100 * 10
    again = _run(epochs=2, seed=3, weight_decay=3e-2)
    for (name, a), b in zip(first["model"].state_dict().items(),
                            again["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["test_acc"] == first["test_acc"] and written["method"] == "str"
    assert (tmp_path / "budget.png").stat().st_size > 1000
    assert "total" in written["budget_table"]


def test_dense_baseline_has_no_thresholds():
    result = _run(epochs=1, dense_baseline=True)
    assert result["test_acc"] > 0.5 and result["sparsity"] is None
    assert result["overall_sparsity"] == 0.0 and result["thresholds"] == []


def test_conv_model_trains():
    result = _run(epochs=1, model="conv2", width_mult=0.125, per_channel=True)
    assert 0.0 <= result["test_acc"] <= 1.0
    assert [layer["kind"] for layer in result["budget"]["layers"]] == \
        ["conv2d", "conv2d", "linear", "linear", "linear"]


def test_resume_with_target_controller_continues_bit_identically(tmp_path):
    kwargs = {"epochs": 3, "seed": 1, "target_sparsity": 0.8}
    full = _run(tmp_path / "full", **kwargs)
    _run(tmp_path / "split", stop_after=1, **kwargs)
    saved = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    group = next(g for g in saved["optimizer"]["param_groups"] if g["name"] == "thresholds")
    assert group["target_step"] == steps_per_epoch(1438, 128)   # controller state is saved
    resumed = _run(tmp_path / "split", resume=str(tmp_path / "split" / "checkpoint.pt"),
                   **kwargs)
    for name, tensor in full["model"].state_dict().items():
        assert torch.equal(tensor, resumed["model"].state_dict()[name]), name
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]
    assert strip(full["history"]) == strip(resumed["history"])
    with pytest.raises(CheckpointError, match="s_init"):
        _run(s_init=-9.0, resume=str(tmp_path / "split" / "checkpoint.pt"), **kwargs)


def test_target_sparsity_reaches_ninety_percent_on_digits():
    result = _run(epochs=15, target_sparsity=0.9)
    assert abs(result["sparsity"] - 0.9) < 0.04, result["sparsity"]
    assert result["test_acc"] > 0.85


# ---------------------------------------------------------------------------------------------
# the controller
# ---------------------------------------------------------------------------------------------


def test_ramp_schedule_is_cubic():
    assert ramp_schedule(0.9, 0, 100) == 0.0
    assert ramp_schedule(0.9, 50, 100) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert ramp_schedule(0.9, 100, 100) == ramp_schedule(0.9, 500, 100) == 0.9
    assert ramp_schedule(0.9, 0, 0) == 0.9


def _tiny_str_model(s: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(STRLinear(16, 16, bias=False, s_init=s))
    opt = make_optimizer(model, STRRecipe(weight_decay=1e-3))
    return model, opt


def test_controller_raises_decay_below_target_and_lowers_it_above():
    model, opt = _tiny_str_model(-20.0)                      # dense: sparsity 0
    ctrl = TargetSparsity(model, opt, target=0.9, total_steps=10, ramp=0.0)
    decay = ctrl.update()
    assert decay == pytest.approx(1e-3 + 0.5 * 0.9 + 0.02 * 0.9)
    model2, opt2 = _tiny_str_model(20.0)                     # threshold ~1: all zero
    ctrl2 = TargetSparsity(model2, opt2, target=0.5, total_steps=10, ramp=0.0)
    assert ctrl2.update() < 0 and ctrl2.last_sparsity == 1.0
    for _ in range(1000):
        ctrl2.update()
    assert ctrl2.group["weight_decay"] == -1.0                # clipped at max_decay
    assert ctrl2.group["target_integral"] == -50.0            # anti-windup
    ctrl.attach()
    loss = model(torch.randn(4, 16)).sum()
    loss.backward()
    opt.step()
    assert ctrl.group["target_step"] == 2                     # the hook ran once
    ctrl.detach()
    opt.step()
    assert ctrl.group["target_step"] == 2


def test_controller_rejects_unusable_set_ups():
    model, opt = _tiny_str_model(-5.0)
    with pytest.raises(ValueError, match="target sparsity"):
        TargetSparsity(model, opt, target=1.0, total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        TargetSparsity(model, opt, target=0.5, total_steps=0)
    with pytest.raises(ValueError, match="thresholds"):
        TargetSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, 10)
    with pytest.raises(ValueError, match="STR layers"):
        TargetSparsity(nn.Linear(2, 2), opt, 0.5, 10)


# ---------------------------------------------------------------------------------------------
# DDP and the example
# ---------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    info = init_ddp_worker(rank, port, world_size=2)
    recipe = STRRecipe(epochs=1, progress=False, seed=0, target_sparsity=0.5, device="cpu",
                       out=out_dir if rank == 0 else None)
    result = train_str(recipe, info=info, log=_quiet)
    state = {k: v.detach() for k, v in result["model"].state_dict().items()}
    torch.save({"state": state, "acc": result["test_acc"], "world": info.world_size},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    ranks = run_ddp_workers(_ddp_worker, tmp_path, nprocs=2, timeout_s=60)
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for name, tensor in ranks[0]["state"].items():       # weights, thresholds all-reduced
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert ranks[0]["acc"] == ranks[1]["acc"] > 0.5
    assert json.loads((tmp_path / "result.json").read_text())["world_size"] == 2


def test_sweep_example_runs_and_writes_results(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    spec = importlib.util.spec_from_file_location(
        "str_digits_example", os.path.join(ROOT, "examples", "str_digits.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)                      # in-process: no second torch import
    monkeypatch.setattr(sys, "argv", ["str_digits.py", "--epochs", "1", "--s-init", "-4",
                                      "--weight-decay", "2e-2", "--threshold-decay", "5e-2",
                                      "--targets", "0.5",
                                      "--out", str(out)])
    example.main()
    assert "| s_init |" in capsys.readouterr().out
    payload = json.loads((tmp_path / "sweep.json").read_text())
    runs = payload["runs"]
    assert [r["kind"] for r in runs] == ["dense", "str", "str-st", "target"]
    assert all(0.0 <= r["mean_sparsity"] <= 1.0 for r in runs[1:])
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| s_init |" in (tmp_path / "sweep.md").read_text()
