"""The ``subkern`` command.

``subkern info [--json]``
    Versions, devices, CPU features, what is built, and the backend each op runs on.
``subkern bench [--quick] [--device cpu|cuda|auto] [--threads N] [--out DIR] [--ops hamming]``
    Benchmarks against the rivals (FAISS, the torch reference, ...): prints a table, writes
    ``<family>_<device>[_quick].json`` (every raw timing, machine, versions, threads, date) and
    ``.png`` (speedup chart) into ``--out``. Exit status 1 when a result does not match its rival
    or an implementation failed, 2 for unusable arguments (e.g. ``--device cuda`` without CUDA).
``subkern train edgepopup [--data digits|mnist|cifar10|imagenet] [--data-dir DIR] [--workers N]
[--model fc] [--k 0.5] [--init signed_constant] [--epochs N] [--lr 0.1] [--batch-size 128]
[--seed 0] [--out DIR] [--resume CKPT] [--dense-baseline] [--device auto|cpu|cuda]``
    Edge-popup reference training (subkern.methods.edgepopup) with a progress bar, a checkpoint
    every epoch (``--out``) and resume; multi-GPU / multi-node through ``torchrun -m subkern.cli``.
    Exit status 2 for unusable arguments, data or checkpoints.
``subkern train str [--data digits|mnist|cifar10|imagenet] [--data-dir DIR] [--workers N]
[--model fc] [--s-init S] [--weight-decay WD] [--target-sparsity T] [--per-channel] [--epochs N]
[--lr 0.1] [--batch-size 128] [--seed 0] [--out DIR] [--resume CKPT] [--dense-baseline]
[--device auto|cpu|cuda]``
    STR reference training (subkern.methods.str): learned soft thresholds, the same progress bar,
    checkpoints, resume and torchrun support; prints the test accuracy, the overall sparsity and
    the per-layer budget table (``--out`` also gets ``result.json`` and ``budget.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_OUT = os.path.join("benchmarks", "results")


def _parser() -> argparse.ArgumentParser:
    from .bench import FAMILIES

    parser = argparse.ArgumentParser(
        prog="subkern", description="subkern: what is installed and which backend runs (info), "
        "benchmarks against FAISS and the torch reference (bench)")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, devices, CPU features, build, backends per op")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    bench = sub.add_parser("bench", help="benchmark against FAISS / the torch reference")
    bench.add_argument("--quick", action="store_true",
                       help="small sizes (well under a minute on 2 cores), not the issue's")
    bench.add_argument("--size", choices=("tiny", "quick", "full"), default=None,
                       help=argparse.SUPPRESS)   # tiny: seconds, for the tests
    bench.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                       help="auto: cuda when available, else cpu (default auto)")
    bench.add_argument("--threads", type=int, default=None,
                       help="CPU threads for every implementation (default: os.cpu_count())")
    bench.add_argument("--out", default=DEFAULT_OUT,
                       help=f"folder for the JSON and PNG (default {DEFAULT_OUT})")
    bench.add_argument("--ops", default="hamming",
                       help=f"comma-separated op families: {', '.join(FAMILIES)} (default hamming)")
    bench.add_argument("--stat", choices=("best", "median"), default="best",
                       help="repetition statistic in the table (default best; both in the JSON)")
    bench.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    bench.add_argument("--cpu-isa", default="auto",
                       help="ISA levels of the C++ CPU kernels to time, comma-separated from "
                            "avx512, avx2, portable, or 'all' (default auto: the best one)")
    bench.add_argument("--no-plot", action="store_true", help="skip the PNG")
    _add_train_parser(sub)
    return parser


def _add_data_args(parser: argparse.ArgumentParser, datasets: Sequence[str],
                   models: Sequence[str]) -> None:
    """The data set and architecture flags every ``train`` method shares."""
    parser.add_argument("--data", choices=datasets, default="digits",
                        help="digits (embedded, default), or mnist / cifar10 / imagenet from "
                             "--data-dir")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the MNIST / CIFAR-10 files, or ImageNet's train/ and "
                             "val/ class folders")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes (0; use several for ImageNet)")
    parser.add_argument("--model", choices=tuple(models), default="fc",
                        help="architecture (fc)")
    parser.add_argument("--width-mult", type=float, default=1.0,
                        help="scale every layer's width (1.0: the paper's)")


def _add_run_args(parser: argparse.ArgumentParser, out_help: str, dense_help: str) -> None:
    """The batch, seed, output / resume, dense-layer, device and progress flags every ``train``
    method shares (``--out`` / ``--dense-baseline`` described by ``out_help`` / ``dense_help``)."""
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--resume", default=None,
                        help="continue from a checkpoint file (or a folder holding "
                             "checkpoint.pt)")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end after this epoch (checkpointed; continue with --resume)")
    parser.add_argument("--dense-baseline", action="store_true", help=dense_help)
    parser.add_argument("--first-layer-dense", action="store_true",
                        help="keep the first layer dense")
    parser.add_argument("--last-layer-dense", action="store_true",
                        help="keep the last layer dense")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available (default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from .data import DATASETS
    from .methods.edgepopup.models import MODELS
    from .methods.edgepopup.recipe import DIGITS_EPOCHS, PAPER_EPOCHS
    from .nn.init import INIT_MODES

    train = sub.add_parser("train", help="reference training of a sparse method")
    methods = train.add_subparsers(dest="method", required=True)
    ep = methods.add_parser(
        "edgepopup", help="edge-popup: train the scores of a frozen random network",
        description="Edge-popup (Ramanujan et al., 2020): find a subnetwork of a randomly "
        "weighted network by training one score per weight; only scores train.")
    _add_data_args(ep, DATASETS, MODELS)
    ep.add_argument("--k", type=float, default=0.5, help="fraction of weights kept (0.5)")
    ep.add_argument("--init", choices=INIT_MODES, default="signed_constant",
                    help="weight init (signed_constant)")
    ep.add_argument("--scale-fan", action="store_true", help="scaled init: std / sqrt(k)")
    ep.add_argument("--epochs", type=int, default=None,
                    help=f"default {DIGITS_EPOCHS} on digits, {PAPER_EPOCHS} otherwise")
    ep.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (0.1), cosine")
    ep.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    ep.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (1e-4)")
    ep.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    ep.add_argument("--label-smoothing", type=float, default=0.0, help="(0.0)")
    _add_run_args(ep, out_help="folder for checkpoint.pt and result.json",
                  dense_help="train the same architecture densely (all weights), no masks")
    _add_str_parser(methods, DATASETS, MODELS)


def _add_str_parser(methods: argparse._SubParsersAction, datasets: Sequence[str],
                    models: Sequence[str]) -> None:
    from .methods.str.recipe import DATA_DEFAULTS

    digits = DATA_DEFAULTS["digits"]
    st = methods.add_parser(
        "str", help="STR: learn each layer's sparsity with a soft threshold",
        description="STR (Kusupati et al., 2020): W_eff = sign(W) relu(|W| - sigmoid(s)) with a "
        "learned threshold s per layer; sparsity emerges from (s_init, weight decay) or is "
        "steered to --target-sparsity.")
    _add_data_args(st, datasets, models)
    st.add_argument("--s-init", type=float, default=None,
                    help=f"initial threshold parameter s (default per data set: "
                         f"{digits['s_init']} on digits, -100 on cifar10)")
    st.add_argument("--per-channel", action="store_true",
                    help="one threshold per output channel instead of per layer")
    st.add_argument("--weight-decay", type=float, default=None,
                    help=f"weight decay of W, s and BatchNorm (default per data set: "
                         f"{digits['weight_decay']} on digits, 5e-4 on cifar10)")
    st.add_argument("--threshold-decay", type=float, default=None,
                    help="separate weight decay for s (default: --weight-decay, official)")
    st.add_argument("--no-bn-decay", action="store_true", help="no weight decay on BatchNorm")
    st.add_argument("--target-sparsity", type=float, default=None,
                    help="steer the thresholds' decay to reach this overall sparsity (0..1)")
    st.add_argument("--target-ramp", type=float, default=0.75,
                    help="fraction of the run over which the target ramps up (0.75)")
    st.add_argument("--epochs", type=int, default=None,
                    help=f"default {digits['epochs']} on digits (the recipe's otherwise)")
    st.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (0.1), cosine")
    st.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    st.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    st.add_argument("--warmup", type=int, default=None, help="linear warm-up epochs")
    st.add_argument("--label-smoothing", type=float, default=0.1, help="(0.1, the paper's)")
    _add_run_args(st, out_help="folder for checkpoint.pt, result.json and budget.png",
                  dense_help="train the same architecture densely (no thresholds)")


def _cmd_info(args: argparse.Namespace) -> int:
    from .bench import environment

    info = environment.collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(environment.format_info(info))
    return 0


def _resolve_device(requested: str) -> tuple[str | None, str | None]:
    from .bench import environment

    reason = environment.cuda_unavailable_reason()
    if requested == "auto":
        return ("cuda" if reason is None else "cpu"), None
    if requested == "cuda" and reason is not None:
        return None, f"--device cuda: {reason}"
    return requested, None


def _cmd_bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    from .bench import environment, family_module, harness, plot

    device, problem = _resolve_device(args.device)
    if problem is not None or device is None:
        print(f"subkern bench: {problem}", file=sys.stderr)
        return 2
    size = args.size or ("quick" if args.quick else "full")
    threads = args.threads if args.threads is not None else (os.cpu_count() or 1)
    if threads < 1:
        print("subkern bench: --threads must be >= 1", file=sys.stderr)
        return 2
    families = [name.strip() for name in args.ops.split(",") if name.strip()]
    try:
        modules = [family_module(name) for name in families]
    except KeyError as err:
        print(f"subkern bench: {err.args[0]}", file=sys.stderr)
        return 2
    isas = tuple(isa.strip() for isa in args.cpu_isa.split(",") if isa.strip()) or ("auto",)
    config = harness.BenchConfig(device=device, size=size, threads=threads, stat=args.stat,
                                 cpu_isas=isas, reps=args.reps,
                                 log=lambda msg: print(msg, flush=True))
    thread_state = harness.set_threads(threads)
    status = 0
    try:
        machine = environment.collect()
        print(f"subkern bench: device {device}, size {size}, {threads} threads "
              f"(torch {thread_state['torch']}, faiss {thread_state.get('faiss')}), "
              f"stat {args.stat}, out {args.out}", flush=True)
        busy = environment.busy_warning()
        if busy is not None:
            print(f"WARNING: {busy}", flush=True)
        for module in modules:
            family_start = time.perf_counter()
            result = module.run(config)
            wall = time.perf_counter() - family_start
            stem = harness.output_stem(result.family, device, size)
            print()
            print(f"== {module.DESCRIPTION} ({device}, {size}) ==")
            print(harness.format_table(result.rows))
            print(harness.TABLE_LEGEND)
            for note in result.notes:
                print(f"note: {note}")
            for skipped in result.skipped:
                print(f"skipped: {skipped['what']}: {skipped['reason']}")
            for row in result.rows:
                if not row.match:
                    message = (f"!!! MISMATCH: {row.case} {row.ours} vs {row.rival}: "
                               f"{row.match_detail}")
                    print(message)
                    print(message, file=sys.stderr)
            for error in result.errors:
                message = f"!!! ERROR: {error['what']}: {error['error']}"
                print(message)
                print(message, file=sys.stderr)
            threads_info = {"requested": threads, **{k: v for k, v in thread_state.items()
                                                     if not k.endswith("_before")}}
            payload = harness.report_payload(result, config, machine, wall, threads_info)
            json_path = harness.write_json(os.path.join(args.out, stem + ".json"), payload)
            print(f"wrote {json_path}")
            if not args.no_plot:
                png_path = os.path.join(args.out, stem + ".png")
                title = (f"subkern {result.family} on {device} ({size}): "
                         f"{machine['cpu']['model'] if device == 'cpu' else _gpu_name(machine)}, "
                         f"{threads} threads")
                why = plot.plot_rows(result.rows, png_path, title)
                print(f"wrote {png_path}" if why is None else f"no plot: {why}")
            if not result.ok:
                status = 1
    finally:
        harness.restore_threads(thread_state)
    print(f"subkern bench wall time: {time.perf_counter() - started:.1f} s")
    return status


def _shared_recipe_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields of the flags every ``train`` method shares (all but ``resume``)."""
    return {"data": args.data, "data_dir": args.data_dir, "model": args.model,
            "width_mult": args.width_mult, "epochs": args.epochs, "lr": args.lr,
            "momentum": args.momentum, "weight_decay": args.weight_decay,
            "nesterov": args.nesterov, "label_smoothing": args.label_smoothing,
            "batch_size": args.batch_size, "seed": args.seed,
            "first_layer_dense": args.first_layer_dense,
            "last_layer_dense": args.last_layer_dense, "dense_baseline": args.dense_baseline,
            "device": args.device, "out": args.out, "stop_after": args.stop_after,
            "progress": not args.no_progress, "workers": args.workers}


def _run_training(method: str, recipe_cls: Callable[..., Any],
                  train: Callable[[Any], dict[str, Any]], checkpoint_name: str,
                  args: argparse.Namespace, **fields: Any) -> tuple[Any, dict[str, Any]] | int:
    """Build ``recipe_cls`` from the shared flags and ``fields`` (``--resume`` may name the
    folder holding ``checkpoint_name``) and run ``train`` on it. Returns ``(recipe, result)``
    on the main process, else the exit status: 2 after printing a bad recipe's or a failed run's
    error, 0 on the other ranks of a distributed run."""
    from .data import DataError
    from .training import CheckpointError

    resume = args.resume
    if resume is not None and os.path.isdir(resume):
        resume = os.path.join(resume, checkpoint_name)
    try:
        recipe = recipe_cls(**_shared_recipe_fields(args), resume=resume, **fields)
        result = train(recipe)
    except (ValueError, TypeError, DataError, CheckpointError, RuntimeError) as err:
        print(f"subkern train {method}: {err}", file=sys.stderr)
        return 2
    if result["world_size"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0
    return recipe, result


def _cmd_train_str(args: argparse.Namespace) -> int:
    from .methods.str import STRRecipe, train_str
    from .methods.str.trainer import CHECKPOINT_NAME, RESULT_NAME

    outcome = _run_training(
        "str", STRRecipe, train_str, CHECKPOINT_NAME, args, s_init=args.s_init,
        per_channel=args.per_channel, threshold_decay=args.threshold_decay,
        bn_decay=not args.no_bn_decay, warmup=args.warmup,
        target_sparsity=args.target_sparsity, target_ramp=args.target_ramp)
    if isinstance(outcome, int):
        return outcome
    recipe, result = outcome
    epochs = result["history"][-1]["epoch"] if result["history"] else 0
    if recipe.dense_baseline:
        what = "dense baseline"
    else:
        what = (f"STR, s_init {recipe.s_init_value:g}, weight decay "
                f"{recipe.weight_decay_value:g}"
                + ("" if recipe.target_sparsity is None
                   else f", target sparsity {recipe.target_sparsity:g}")
                + f": sparsity {result['sparsity']:.4f}")
    print(result["budget_table"])
    print(f"{recipe.model} on {recipe.data}: {what}: test accuracy {result['test_acc']:.4f}, "
          f"overall sparsity {result['overall_sparsity']:.4f} after {epochs} of "
          f"{recipe.num_epochs} epochs")
    if recipe.out:
        print(f"wrote {os.path.join(recipe.out, RESULT_NAME)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    if args.method == "str":
        return _cmd_train_str(args)
    from .methods.edgepopup import EdgePopupRecipe, train_edgepopup
    from .methods.edgepopup.trainer import CHECKPOINT_NAME

    outcome = _run_training("edgepopup", EdgePopupRecipe, train_edgepopup, CHECKPOINT_NAME,
                            args, k=args.k, init=args.init, scale_fan=args.scale_fan)
    if isinstance(outcome, int):
        return outcome
    recipe, result = outcome
    what = ("dense baseline" if recipe.dense_baseline else
            f"edge-popup subnetwork, k={recipe.k} kept ({result['kept_fraction']:.3f} of the "
            f"weights), init {recipe.init}{' scaled' if recipe.scale_fan else ''}")
    print(f"{recipe.model} on {recipe.data}: {what}: test accuracy {result['test_acc']:.4f} "
          f"after {result['history'][-1]['epoch'] if result['history'] else 0} of "
          f"{recipe.num_epochs} epochs")
    if recipe.out:
        print(f"wrote {os.path.join(recipe.out, 'result.json')}")
    return 0


def _gpu_name(machine: dict) -> str:
    devices = machine.get("cuda", {}).get("devices") or []
    return devices[0]["name"] if devices else "GPU"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``subkern`` command; returns the exit status."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args.command == "info":
        return _cmd_info(args)
    if args.command == "train":
        return _cmd_train(args)
    return _cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
