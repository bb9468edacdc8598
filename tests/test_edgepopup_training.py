"""Edge-popup reference training: models, recipe, seeding, checkpoint + bit-identical resume,
refusal of damaged checkpoints, a 1-epoch digits smoke run, the CLI and a 2-process DDP run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from _helpers import init_ddp_worker, run_ddp_workers
from torch import nn

from subkern import cli
from subkern.methods.edgepopup import (
    MODELS,
    Builder,
    EdgePopupRecipe,
    build_model,
    make_model,
    make_optimizer,
    train_edgepopup,
)
from subkern.nn import NonAffineBatchNorm2d, SubnetConv2d, SubnetLinear
from subkern.training import (
    CHECKPOINT_VERSION,
    CheckpointError,
    DistInfo,
    cosine_lr,
    load_checkpoint,
    save_checkpoint,
)
from subkern.training import checkpoint as ckpt_mod

QUIET = {"progress": False}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quiet(_msg: str) -> None:
    return None


def _run(tmp_path=None, **kwargs):
    recipe = EdgePopupRecipe(**QUIET, **kwargs,
                             out=None if tmp_path is None else str(tmp_path))
    return train_edgepopup(recipe, info=DistInfo(), log=_quiet)


# ---------------------------------------------------------------------------------------------
# models and recipe
# ---------------------------------------------------------------------------------------------


# (name, input, masked layers: convs + linears) at 1/8 of the paper's widths, for speed
@pytest.mark.parametrize("name,shape,layers", [
    ("fc", (1, 28, 28), 3), ("conv2", (3, 32, 32), 5), ("conv4", (3, 32, 32), 7),
    ("conv6", (3, 32, 32), 9), ("conv8", (3, 32, 32), 11), ("cresnet18", (3, 32, 32), 21),
    ("cresnet50", (3, 16, 16), 54), ("resnet18", (3, 64, 64), 21),
    ("resnet50", (3, 32, 32), 54)])
def test_paper_models_forward_and_only_scores_train(name, shape, layers):
    torch.manual_seed(0)
    model = build_model(name, Builder(k=0.3), shape, 10, width_mult=0.125).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)
    masked = [m for m in model.modules() if isinstance(m, (SubnetLinear, SubnetConv2d))]
    assert len(masked) == layers and all(m.k == 0.3 and m.bias is None for m in masked)
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(
        m, (SubnetLinear, SubnetConv2d)) for m in model.modules())   # first and last masked too
    assert all(n.endswith("scores") for n, p in model.named_parameters() if p.requires_grad)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(isinstance(m, NonAffineBatchNorm2d) for m in bns)
    assert MODELS  # registry is not empty


def test_official_layer_sizes_and_dense_variants():
    conv4 = build_model("conv4", Builder(init=None), (3, 32, 32), 10)
    assert conv4.linear[0].in_features == 8192                   # official 32 * 32 * 8
    fc = build_model("fc", Builder(), (1, 28, 28), 10)
    assert [m.out_features for m in fc.linear if isinstance(m, nn.Linear)] == [300, 100, 10]
    edge = build_model("conv2", Builder(first_layer_dense=True, last_layer_dense=True),
                       (3, 32, 32), 10)
    assert type(edge.convs[0]) is nn.Conv2d and type(edge.linear[-1]) is nn.Linear
    assert isinstance(edge.convs[2], SubnetConv2d)
    dense = make_model(EdgePopupRecipe(dense_baseline=True, model="conv2"), (3, 32, 32), 10)
    assert all(p.requires_grad for p in dense.parameters())
    assert not any(isinstance(m, (SubnetLinear, SubnetConv2d)) for m in dense.modules())
    assert Builder(subnet=False).batchnorm(4).affine and not Builder().batchnorm(4).affine
    with pytest.raises(ValueError, match="too small"):
        build_model("conv8", Builder(), (1, 8, 8), 10)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", Builder(), (1, 8, 8), 10)


def test_recipe_defaults_are_the_papers_and_optimizer_sees_scores_only():
    recipe = EdgePopupRecipe()
    assert (recipe.lr, recipe.momentum, recipe.weight_decay, recipe.batch_size) == \
        (0.1, 0.9, 1e-4, 128)
    assert (recipe.k, recipe.init, recipe.nesterov, recipe.label_smoothing) == \
        (0.5, "signed_constant", False, 0.0)
    assert EdgePopupRecipe(data="cifar10").num_epochs == 100
    assert EdgePopupRecipe(data="cifar10").use_augment and not recipe.use_augment
    model = make_model(recipe, (1, 8, 8), 10)
    opt = make_optimizer(model, recipe)
    scores = {id(m.scores) for m in model.modules() if isinstance(m, SubnetLinear)}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == scores
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    for bad in ({"k": 0.0}, {"init": "xavier"}, {"model": "vgg"}, {"data": "svhn"},
                {"epochs": 0}, {"label_smoothing": 1.0}, {"stop_after": 1},
                {"width_mult": 0.0}):
        with pytest.raises(ValueError):
            EdgePopupRecipe(**bad)


def test_cosine_schedule_matches_official_formula():
    assert cosine_lr(0.1, 0, 10) == pytest.approx(0.1)
    assert cosine_lr(0.1, 5, 10) == pytest.approx(0.05)
    assert cosine_lr(0.1, 9, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.9)))
    assert cosine_lr(0.1, 0, 10, warmup=2) == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------
# training: smoke, seeding, checkpoint, resume
# ---------------------------------------------------------------------------------------------


def test_one_epoch_on_digits_is_far_above_chance_and_seeded(tmp_path):
    first = _run(tmp_path, epochs=1, seed=3)
    assert first["test_acc"] > 0.5                       # chance is 0.1
    assert first["kept_fraction"] == pytest.approx(0.5, abs=0.01)
    again = _run(epochs=1, seed=3)
    for (name, a), b in zip(first["model"].state_dict().items(),
                            again["model"].state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert again["test_acc"] == first["test_acc"]
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["test_acc"] == first["test_acc"] and written["method"] == "edgepopup"


def test_dense_baseline_trains_all_weights():
    result = _run(epochs=1, dense_baseline=True)
    assert result["test_acc"] > 0.5 and result["kept_fraction"] is None
    assert result["trainable_parameters"] == 64 * 300 + 300 * 100 + 100 * 10


def test_resume_continues_bit_identically(tmp_path):
    full = _run(tmp_path / "full", epochs=2, seed=1)
    _run(tmp_path / "split", epochs=2, seed=1, stop_after=1)
    saved = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    assert saved["epoch"] == 1
    resumed = _run(tmp_path / "split", epochs=2, seed=1,
                   resume=str(tmp_path / "split" / "checkpoint.pt"))
    full_state, resumed_state = full["model"].state_dict(), resumed["model"].state_dict()
    for name, tensor in full_state.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, resumed_state[name]), name
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]
    assert strip(full["history"]) == strip(resumed["history"])
    with pytest.raises(CheckpointError, match="k="):
        _run(epochs=2, seed=1, k=0.3, resume=str(tmp_path / "split" / "checkpoint.pt"))
    with pytest.raises(CheckpointError, match="seed"):
        _run(epochs=2, seed=2, resume=str(tmp_path / "split" / "checkpoint.pt"))


def test_checkpoint_is_atomic_and_damaged_files_are_refused(tmp_path):
    path = str(tmp_path / "c.pt")
    state = {"w": torch.arange(10.0), "epoch": 3, "history": [{"a": 1.0}], "name": "x"}
    save_checkpoint(path, state)
    save_checkpoint(path, state | {"epoch": 4})          # overwrite through os.replace
    assert os.listdir(tmp_path) == ["c.pt"]              # no temporary file left behind
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 4 and torch.equal(loaded["w"], state["w"])
    raw = bytearray(open(path, "rb").read())
    flipped = bytearray(raw)
    flipped[-10] ^= 0x01
    cases = {"checksum": bytes(flipped), "truncated": bytes(raw[:20]),
             "not a subkern": b"PK\x03\x04" + bytes(raw[4:]),
             "version": bytes(raw[:8]) + (CHECKPOINT_VERSION + 1).to_bytes(4, "little")
             + bytes(raw[12:])}
    for match, blob in cases.items():
        bad = tmp_path / f"bad_{len(blob)}_{match[:3]}.pt"
        bad.write_bytes(blob)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(str(bad))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    assert ckpt_mod.MAGIC == b"SUBKCKPT"


def test_cli_train_edgepopup(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "edgepopup", "--epochs", "2", "--stop-after", "1", "--out",
                     str(out), "--no-progress", "--device", "cpu"]) == 0
    assert cli.main(["train", "edgepopup", "--epochs", "2", "--resume", str(out), "--out",
                     str(out), "--no-progress", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "test accuracy" in text and "after 2 of 2 epochs" in text
    assert json.loads((out / "result.json").read_text())["history"][-1]["epoch"] == 2
    (tmp_path / "bad.pt").write_bytes(b"garbage, not a checkpoint: " * 4)
    assert cli.main(["train", "edgepopup", "--resume", str(tmp_path / "bad.pt"),
                     "--no-progress"]) == 2
    assert cli.main(["train", "edgepopup", "--data", "mnist", "--no-progress"]) == 2
    assert cli.main(["train", "edgepopup", "--k", "1.5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "(0, 1]" in err and "not a subkern checkpoint" in err


# ---------------------------------------------------------------------------------------------
# DDP: 2 processes, gloo on CPU
# ---------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    info = init_ddp_worker(rank, port, world_size=2)
    recipe = EdgePopupRecipe(epochs=1, progress=False, seed=0, batch_size=128,
                             out=out_dir if rank == 0 else None)
    result = train_edgepopup(recipe, info=info, log=_quiet)
    scores = [m.scores.detach() for m in result["model"].modules()
              if isinstance(m, SubnetLinear)]
    torch.save({"scores": scores, "acc": result["test_acc"], "world": info.world_size},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    ranks = run_ddp_workers(_ddp_worker, tmp_path, nprocs=2, timeout_s=60)
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    for a, b in zip(ranks[0]["scores"], ranks[1]["scores"], strict=True):
        assert torch.equal(a, b)                          # gradients were all-reduced
    assert ranks[0]["acc"] == ranks[1]["acc"] > 0.5
    # the two shards of each global batch are the single process's batch, and DDP averages the
    # gradients: the run equals a one-process run up to float rounding
    single = _run(epochs=1, seed=0, batch_size=128)
    single_scores = [m.scores.detach() for m in single["model"].modules()
                     if isinstance(m, SubnetLinear)]
    for a, b in zip(ranks[0]["scores"], single_scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert abs(ranks[0]["acc"] - single["test_acc"]) < 0.02
    assert json.loads((tmp_path / "result.json").read_text())["world_size"] == 2


def test_example_runs_and_writes_results(tmp_path):
    out = tmp_path / "digits.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "edgepopup_digits.py"),
                           "--epochs", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["run"] for r in rows] == ["edge-popup, signed constant",
                                        "edge-popup, kaiming normal",
                                        "dense baseline (kaiming normal)"]
    assert all(r["mean_test_acc"] > 0.5 for r in rows)
    assert "chance" in proc.stdout


def test_cifar10_conv_training_path_with_augmentation(tmp_path):
    """CIFAR-10 python batches (written here) through the CLI: conv2, crop+flip augmentation."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (8, 3072)).astype(np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 8)]}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
    out = tmp_path / "run"
    assert cli.main(["train", "edgepopup", "--data", "cifar10", "--data-dir", str(tmp_path),
                     "--model", "conv2", "--width-mult", "0.125", "--epochs", "1",
                     "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["recipe"]["model"] == "conv2" and len(result["history"]) == 1
    assert 0.0 <= result["test_acc"] <= 1.0
