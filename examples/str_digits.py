"""STR on scikit-learn's digits: the sparsity vs. accuracy curve of a (s_init, weight decay) sweep.

Trains the FC network 64-300-100-10 with STR (W_eff = sign(W) relu(|W| - sigmoid(s)), one
threshold per layer, the paper's recipe: SGD 0.1 momentum 0.9, cosine, label smoothing 0.1,
weight decay on W, s and BatchNorm) for every pair of the grid, and the dense network of the same
shape with the same recipe; optionally also runs with the target-sparsity controller. Writes
``<out>.json`` (every run, per seed), ``<out>.md`` (the table) and ``<out>.png`` (test accuracy
against sparsity, the dense accuracy as a line).

    python examples/str_digits.py                                   # a few minutes on 2 cores
    python examples/str_digits.py --seeds 0 1 2 --targets 0.9 0.95 \
        --out benchmarks/results/str_digits_sweep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import subkern
from subkern.methods.str import DATA_DEFAULTS, STRRecipe, train_str
from subkern.training import DistInfo

S_INITS = (-8.0, -4.0, -2.0)
WEIGHT_DECAYS = (2e-3, 5e-3, 1e-2, 2e-2)
THRESHOLD_DECAYS = (3e-2, 5e-2, 7e-2, 1e-1)


def _quiet(_msg: str) -> None:
    return None


def run_point(settings: dict, seeds: list[int], epochs: int | None) -> dict:
    accs, sparsities, seconds, layers = [], [], [], []
    for seed in seeds:
        recipe = STRRecipe(epochs=epochs, seed=seed, progress=False, device="cpu", **settings)
        started = time.perf_counter()
        result = train_str(recipe, info=DistInfo(), log=_quiet)
        seconds.append(time.perf_counter() - started)
        accs.append(result["test_acc"])
        sparsities.append(result["overall_sparsity"])
        layers.append([layer["sparsity"] for layer in result["budget"]["layers"]])
    return {"settings": settings, "epochs": recipe.num_epochs, "seeds": seeds,
            "test_acc": accs, "sparsity": sparsities, "mean_test_acc": statistics.fmean(accs),
            "mean_sparsity": statistics.fmean(sparsities),
            "layer_sparsity": [statistics.fmean(v) for v in zip(*layers, strict=True)],
            "sparse_flops_fraction": result["budget"]["totals"]["flops_fraction"],
            "seconds": seconds}


def write_table(runs: list[dict], dense_acc: float) -> str:
    lines = ["| run | s_init | weight decay | s decay | target | sparsity % | "
             "layer sparsity % | test acc | vs dense |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for run in runs:
        st = run["settings"]
        layers = " / ".join(f"{100 * v:.1f}" for v in run["layer_sparsity"])
        lines.append(
            f"| {run['kind']} | {st.get('s_init', '-')} | {st.get('weight_decay', '-')} | "
            f"{st.get('threshold_decay', '-')} | {st.get('target_sparsity', '-')} | "
            f"{100 * run['mean_sparsity']:.2f} | {layers} | "
            f"{run['mean_test_acc']:.4f} | {run['mean_test_acc'] - dense_acc:+.4f} |")
    return "\n".join(lines)


def plot(runs: list[dict], dense_acc: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    s_inits = sorted({r["settings"]["s_init"] for r in runs if r["kind"] == "str"})
    for s_init in s_inits:
        pts = sorted((r["mean_sparsity"], r["mean_test_acc"]) for r in runs
                     if r["kind"] == "str" and r["settings"]["s_init"] == s_init)
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-",
                label=f"STR, s_init {s_init:g} (wd sweep)")
    decoupled = sorted((r["mean_sparsity"], r["mean_test_acc"]) for r in runs
                       if r["kind"] == "str-st")
    if decoupled:
        ax.plot([100 * p[0] for p in decoupled], [p[1] for p in decoupled], "s-",
                color="tab:purple", label="STR, decoupled decay of s swept (st_decay)")
    targets = [r for r in runs if r["kind"] == "target"]
    if targets:
        ax.plot([100 * r["mean_sparsity"] for r in targets],
                [r["mean_test_acc"] for r in targets], "k*", markersize=11,
                label="STR + target-sparsity controller")
    ax.axhline(dense_acc, color="tab:gray", linestyle="--",
               label=f"best dense {dense_acc:.4f}")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (40)")
    parser.add_argument("--s-init", type=float, nargs="+", default=list(S_INITS))
    parser.add_argument("--weight-decay", type=float, nargs="+", default=list(WEIGHT_DECAYS))
    parser.add_argument("--threshold-decay", type=float, nargs="*",
                        default=list(THRESHOLD_DECAYS),
                        help="also run decoupled decays: the thresholds s get these, W and "
                             "BatchNorm get --decoupled-wd (official --st-decay)")
    parser.add_argument("--decoupled-wd", type=float, default=2e-3)
    parser.add_argument("--decoupled-s-init", type=float, default=-4.0)
    parser.add_argument("--targets", type=float, nargs="*", default=[],
                        help="also run the target-sparsity controller for these targets")
    parser.add_argument("--out", default=None,
                        help="output stem: writes <out>.json, <out>.md and <out>.png")
    args = parser.parse_args()

    started = time.perf_counter()
    runs = []
    for wd in args.weight_decay:      # the dense network with every weight decay of the grid
        run = run_point({"dense_baseline": True, "weight_decay": wd}, args.seeds,
                        args.epochs) | {"kind": "dense"}
        runs.append(run)
        print(f"dense  weight decay {wd:g}: test acc {run['mean_test_acc']:.4f}", flush=True)
    dense = max(runs, key=lambda r: r["mean_test_acc"])     # compare with the best dense run
    grid = [("str", {"s_init": s, "weight_decay": wd})
            for s in args.s_init for wd in args.weight_decay]
    grid += [("str-st", {"s_init": args.decoupled_s_init, "weight_decay": args.decoupled_wd,
                         "threshold_decay": td}) for td in args.threshold_decay]
    grid += [("target", {"target_sparsity": t}) for t in args.targets]
    for kind, settings in grid:
        run = run_point(settings, args.seeds, args.epochs) | {"kind": kind}
        runs.append(run)
        print(f"{kind:6s} {settings}: sparsity {100 * run['mean_sparsity']:.2f}%  test acc "
              f"{run['mean_test_acc']:.4f} ({run['mean_test_acc'] - dense['mean_test_acc']:+.4f}"
              f" vs dense)", flush=True)
    wall = time.perf_counter() - started
    table = write_table(runs, dense["mean_test_acc"])
    print(table)
    print(f"wall time {wall:.1f} s on {torch.get_num_threads()} threads")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        command = ("python examples/str_digits.py --seeds " + " ".join(map(str, args.seeds))
                   + (f" --epochs {args.epochs}" if args.epochs else "")
                   + " --s-init " + " ".join(f"{v:g}" for v in args.s_init)
                   + " --weight-decay " + " ".join(f"{v:g}" for v in args.weight_decay)
                   + " --threshold-decay " + " ".join(f"{v:g}" for v in args.threshold_decay)
                   + (" --targets " + " ".join(f"{v:g}" for v in args.targets)
                      if args.targets else "") + f" --out {args.out}")
        payload = {
            "what": "STR on scikit-learn digits (1438 train / 359 test, 8x8), FC 64-300-100-10, "
                    "sweep over (s_init, weight decay); sparsity over all three layers",
            "command": command, "runs": runs, "dense_test_acc": dense["mean_test_acc"],
            "dense_weight_decay": dense["settings"]["weight_decay"],
            "wall_seconds": wall,
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "subkern": subkern.__version__},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with open(args.out + ".json", "w") as handle:
            json.dump(payload, handle, indent=2)
        with open(args.out + ".md", "w") as handle:
            handle.write(f"# STR on digits: sparsity vs accuracy\n\n`{command}`\n\n"
                         f"Mean over seeds {args.seeds}; {runs[0]['epochs']} epochs; layer "
                         "sparsity (mean): 64x300 / 300x100 / 100x10. \"vs dense\": against "
                         "the best dense run (weight decay "
                         f"{dense['settings']['weight_decay']:g}). Target runs use the digits "
                         f"defaults (s_init {DATA_DEFAULTS['digits']['s_init']}, weight decay "
                         f"{DATA_DEFAULTS['digits']['weight_decay']}); 359 test images, so "
                         "one image is 0.28 points. `str-st`: decoupled decay, s_init "
                         f"{args.decoupled_s_init:g}, W and BatchNorm decay "
                         f"{args.decoupled_wd:g}, s decay as listed.\n\n" + table + "\n")
        plot(runs, dense["mean_test_acc"], args.out + ".png",
             f"STR on digits (FC 64-300-100-10), seeds {args.seeds}")
        print(f"wrote {args.out}.json, {args.out}.md, {args.out}.png")


if __name__ == "__main__":
    main()
