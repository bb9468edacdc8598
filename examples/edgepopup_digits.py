"""Edge-popup on scikit-learn's digits: a subnetwork hidden in a random network.

Trains, with the paper's recipe (SGD 0.1, momentum 0.9, wd 1e-4, cosine), only the scores of a
frozen random FC network (64-300-100-10, k = 0.5 of the weights kept per layer) for two weight
inits, signed constant and kaiming normal, and a dense network of the same shape trained normally.
Prints the test accuracy before training (the random network: chance level) and after.

    python examples/edgepopup_digits.py                      # one seed, about a minute or two
    python examples/edgepopup_digits.py --seeds 0 1 2 --out benchmarks/results/edgepopup_digits.json
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
from subkern.methods.edgepopup import EdgePopupRecipe, train_edgepopup
from subkern.training import DistInfo

RUNS = (("edge-popup, signed constant", {"init": "signed_constant"}),
        ("edge-popup, kaiming normal", {"init": "kaiming_normal"}),
        ("dense baseline (kaiming normal)", {"init": "kaiming_normal", "dense_baseline": True}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--k", type=float, default=0.5)
    parser.add_argument("--model", default="fc")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    rows = []
    started = time.perf_counter()
    for label, settings in RUNS:
        accs, initial, seconds = [], [], []
        for seed in args.seeds:
            recipe = EdgePopupRecipe(model=args.model, k=args.k, epochs=args.epochs, seed=seed,
                                     progress=False, device="cpu", **settings)
            t0 = time.perf_counter()
            result = train_edgepopup(recipe, info=DistInfo(), log=lambda _msg: None)
            seconds.append(time.perf_counter() - t0)
            accs.append(result["test_acc"])
            initial.append(result["initial_test_acc"])
        rows.append({"run": label, "settings": settings, "k": None if settings.get(
            "dense_baseline") else args.k, "epochs": recipe.num_epochs, "seeds": args.seeds,
            "test_acc": accs, "mean_test_acc": statistics.fmean(accs),
            "initial_test_acc": initial, "trainable_parameters":
            result["trainable_parameters"], "seconds": seconds})
        print(f"{label:34s} test accuracy {statistics.fmean(accs):.4f} "
              f"(per seed {', '.join(f'{a:.4f}' for a in accs)}; before training "
              f"{statistics.fmean(initial):.4f}; {statistics.fmean(seconds):.1f} s/run)",
              flush=True)
    wall = time.perf_counter() - started
    print(f"chance: 0.1000; wall time {wall:.1f} s on {torch.get_num_threads()} threads")
    if args.out:
        payload = {
            "what": "edge-popup on scikit-learn digits (1438 train / 359 test, 8x8), FC "
                    f"{args.model}, k={args.k} kept per layer, official recipe",
            "command": "python examples/edgepopup_digits.py " + " ".join(
                ["--seeds", *map(str, args.seeds)] + (["--epochs", str(args.epochs)]
                                                      if args.epochs else [])
                + ["--k", str(args.k), "--out", args.out]),
            "rows": rows, "chance": 0.1, "wall_seconds": wall,
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__, "subkern": subkern.__version__},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(payload, handle, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
