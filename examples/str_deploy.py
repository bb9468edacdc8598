"""Train a small STR network on scikit-learn's digits, export it as sparse inference layers, reload.

STR (Kusupati et al., 2020) learns each layer's sparsity with a soft threshold,
``W_eff = sign(W) relu(|W| - sigmoid(s))``; weight decay on ``s`` raises the thresholds during
training. This example:

1. trains a small conv net (16 / 32 channels: 3x3 convs + BatchNorm, residual blocks, a linear
   head) whose conv and linear layers are ``subkern.nn.str.STRConv2d`` / ``STRLinear``, a few
   epochs with SGD (weight decay 5e-4 on the weights, ``--s-decay`` on the thresholds);
2. exports it with ``subkern.deploy.export`` (BatchNorm folded into the convs; every layer in CSR
   by default, ``--formats auto`` lets each layer take the fastest format for its density and
   shape) and prints the per-layer formats and the artifact size;
3. reloads it with ``subkern.deploy.load`` (no training code needed) and checks that the outputs
   and the test accuracy equal the trained model's; ``torch.export`` works on the loaded model.

    python examples/str_deploy.py            # ~40 s on 2 cores: ~95 % sparse, ~99 % accuracy
    python examples/str_deploy.py --epochs 20 --s-decay 1e-2 --out str_digits.safetensors
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import subkern  # noqa: F401
from subkern import deploy
from subkern.data import load_digits
from subkern.nn.str import STRConv2d, STRLinear


def build(s_init: float) -> nn.Module:
    def block(c: int) -> nn.Module:
        body = nn.Sequential(STRConv2d(c, c, 3, padding=1, bias=False, s_init=s_init),
                             nn.BatchNorm2d(c), nn.ReLU(),
                             STRConv2d(c, c, 3, padding=1, bias=False, s_init=s_init),
                             nn.BatchNorm2d(c))
        return deploy.Residual(body, None, "relu")

    return nn.Sequential(
        STRConv2d(1, 16, 3, padding=1, bias=False, s_init=s_init), nn.BatchNorm2d(16), nn.ReLU(),
        block(16),
        STRConv2d(16, 32, 3, stride=2, padding=1, bias=False, s_init=s_init), nn.BatchNorm2d(32),
        nn.ReLU(), block(32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), STRLinear(32, 10, s_init=s_init))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--s-init", type=float, default=-4.0)
    parser.add_argument("--s-decay", type=float, default=3e-2,
                        help="weight decay on the thresholds' s (higher: sparser)")
    parser.add_argument("--value-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--formats", choices=("csr", "auto", "bitmap", "dense"), default="csr",
                        help="storage format of every layer; 'auto' picks the fastest per layer "
                             "(dense for convolutions this small: the im2col copy dominates)")
    parser.add_argument("--out", default=None, help="artifact path (default: a temporary file)")
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_digits()
    x_train, y_train = data.train.tensors
    x_test, y_test = data.test.tensors
    model = build(args.s_init)
    s_params = [p for n, p in model.named_parameters() if n.endswith(".s") or n == "s"]
    others = [p for n, p in model.named_parameters() if not (n.endswith(".s") or n == "s")]
    opt = torch.optim.SGD([{"params": others, "weight_decay": 5e-4},
                           {"params": s_params, "weight_decay": args.s_decay}],
                          lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        zeros = sum(int((m.effective_weight() == 0).sum()) for m in model.modules()
                    if isinstance(m, (STRConv2d, STRLinear)))
        total = sum(m.weight.numel() for m in model.modules()
                    if isinstance(m, (STRConv2d, STRLinear)))
        print(f"epoch {epoch + 1:2d}: test accuracy {accuracy(model, x_test, y_test):.3f}, "
              f"sparsity {zeros / total:.3f}")

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or os.path.join(tmp, "str_digits.safetensors")
        deploy.export(model, path, value_dtype=getattr(torch, args.value_dtype),
                      formats=args.formats)
        print(f"\nartifact: {os.path.getsize(path) / 1024:.1f} KiB "
              f"(dense float32 weights: {total * 4 / 1024:.1f} KiB)")
        loaded = deploy.load(path)
    print(f"{'layer':<22} {'type':<13} {'format':<7} {'density':>8}")
    for row in deploy.layer_report(loaded):
        print(f"{row['layer']:<22} {row['type']:<13} {row['format']:<7} {row['density']:8.3f}")
    with torch.no_grad():
        diff = float((loaded(x_test) - model(x_test)).abs().max())
        exported = torch.export.export(loaded, (x_test[:1],))
        diff_export = float((exported.module()(x_test[:1]) - loaded(x_test[:1])).abs().max())
    print(f"\ntrained model accuracy {accuracy(model, x_test, y_test):.4f}, "
          f"loaded sparse model {accuracy(loaded, x_test, y_test):.4f}; "
          f"max |difference| of the logits {diff:.2e}; torch.export: {diff_export:.1e}")


if __name__ == "__main__":
    main()
