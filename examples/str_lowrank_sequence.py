"""STR low rank on a generated sequence task: FastGRNN whose matrices learn their rank.

The task: classify noisy sequences (``--length`` steps of ``--dim`` features) into ``--classes``
classes. Each class is a smooth random trajectory in a ``--latent``-dimensional space, seen
through a fixed random ``dim x latent`` mixing matrix, with a random time shift, latent noise and
observation noise; so only a low-dimensional input subspace carries information. Two FastGRNN
classifiers with the same shapes are trained with Adam:

* full rank: ``STRFastGRNN`` with thresholds pinned at zero (``s_init = -1e4``, no decay on s);
* STR low rank: thresholds start at ``s_init`` and carry weight decay (STR's mechanism applied
  to the singular values, Kusupati et al., 2020, section 5).

It prints the test accuracy and the effective ranks of ``W`` (input) and ``U`` (recurrent), then
checks that ``compress()`` (plain factorised matrices of the effective rank) gives the same
predictions.

    python examples/str_lowrank_sequence.py                # under a minute on 2 idle cores
    python examples/str_lowrank_sequence.py --seeds 0 1 2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from subkern.nn.lowrank import STRFastGRNN, STRLowRankLinear


def make_task(n: int, classes: int, length: int, dim: int, latent: int, noise: float,
              seed: int, generator_seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ``[n, length, dim]`` and labels; the class trajectories and the mixing
    matrix come from ``generator_seed`` (shared by train and test), the samples from ``seed``."""
    shared = torch.Generator().manual_seed(generator_seed)
    t = torch.linspace(0, 1, length)
    freqs = 1 + 3 * torch.rand(classes, latent, 2, generator=shared)
    phases = 2 * math.pi * torch.rand(classes, latent, 2, generator=shared)
    mixing = torch.randn(dim, latent, generator=shared) / math.sqrt(latent)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    shift = 0.15 * torch.rand(n, 1, 1, generator=gen)
    tt = (t.view(1, -1, 1) + shift)                                  # [n, length, 1]
    f, p = freqs[labels], phases[labels]                              # [n, latent, 2]
    traj = (torch.sin(2 * math.pi * f[:, None, :, 0] * tt + p[:, None, :, 0])
            + 0.5 * torch.cos(2 * math.pi * f[:, None, :, 1] * tt + p[:, None, :, 1]))
    traj = traj + noise * torch.randn(traj.shape, generator=gen)
    x = traj @ mixing.T + noise * torch.randn(n, length, dim, generator=gen)
    return x, labels


class Classifier(nn.Module):
    def __init__(self, dim: int, hidden: int, classes: int, s_init: float) -> None:
        super().__init__()
        self.rnn = STRFastGRNN(dim, hidden, s_init=s_init)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[1])


def train(model: Classifier, data: tuple, test: tuple, epochs: int, lr: float,
          threshold_decay: float, sigma_decay: float, batch: int, seed: int) -> float:
    """Adam (FastGRNN's optimiser), cosine schedule; L2 decay on the thresholds s and on the
    singular values sigma (STR's decay on its reparameterised parameters)."""
    lowrank = [m for m in model.modules() if isinstance(m, STRLowRankLinear)]
    thresholds = [m.s for m in lowrank]
    sigmas = [m.sigma for m in lowrank]
    ids = {id(p) for p in thresholds + sigmas}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.Adam([{"params": rest, "weight_decay": 0.0},
                            {"params": sigmas, "weight_decay": sigma_decay},
                            {"params": thresholds, "weight_decay": threshold_decay}], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return accuracy(model, test)


@torch.no_grad()
def accuracy(model: nn.Module, test: tuple) -> float:
    model.eval()
    acc = float((model(test[0]).argmax(1) == test[1]).float().mean())
    model.train()
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--latent", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--s-init", type=float, default=-4.0)
    parser.add_argument("--threshold-decay", type=float, default=0.5)
    parser.add_argument("--sigma-decay", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    started = time.perf_counter()
    runs: dict[str, list[dict]] = {"full rank": [], "STR low rank": []}
    for seed in args.seeds:
        task = {"classes": args.classes, "length": args.length, "dim": args.dim,
                "latent": args.latent, "noise": args.noise}
        data = make_task(args.train_size, seed=10 * seed + 1, **task)
        test = make_task(1000, seed=10 * seed + 2, **task)
        for label, s_init, decay in (("full rank", -1e4, 0.0),
                                     ("STR low rank", args.s_init, args.threshold_decay)):
            torch.manual_seed(seed)
            model = Classifier(args.dim, args.hidden, args.classes, s_init)
            acc = train(model, data, test, args.epochs, args.lr, decay,
                        args.sigma_decay if decay else 0.0, args.batch_size, seed)
            ranks = model.rnn.cell.ranks()
            compressed = Classifier(args.dim, args.hidden, args.classes, s_init)
            compressed.load_state_dict(model.state_dict())
            compressed.rnn = model.rnn.compress()
            same = bool((compressed(test[0]).argmax(1) == model(test[0]).argmax(1)).all())
            runs[label].append({"seed": seed, "test_acc": acc, "rank_W": ranks["W"],
                                "rank_U": ranks["U"], "compressed_predictions_equal": same})
            print(f"seed {seed}  {label:13s} test acc {acc:.4f}  rank W {ranks['W']:2d}/"
                  f"{min(args.dim, args.hidden)}  rank U {ranks['U']:2d}/{args.hidden}  "
                  f"compress() same predictions: {same}", flush=True)
    summary = {label: {"mean_test_acc": statistics.fmean(r["test_acc"] for r in rows),
                       "mean_rank_W": statistics.fmean(r["rank_W"] for r in rows),
                       "mean_rank_U": statistics.fmean(r["rank_U"] for r in rows)}
               for label, rows in runs.items()}
    for label, row in summary.items():
        print(f"{label:13s} mean test acc {row['mean_test_acc']:.4f}, mean rank W "
              f"{row['mean_rank_W']:.1f}, U {row['mean_rank_U']:.1f}")
    wall = time.perf_counter() - started
    print(f"chance {1 / args.classes:.3f}; wall time {wall:.1f} s on "
          f"{torch.get_num_threads()} threads")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "runs": runs, "summary": summary,
                       "wall_seconds": wall}, handle, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
