"""The ``subkern`` command: ``info`` (text and JSON) and ``bench`` end to end at a tiny size, plus
the benchmark's correctness checks, roofline formula and memory probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

import subkern
from subkern import cli
from subkern.bench import environment, hamming, harness
from subkern.ops import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _faiss_reason() -> str | None:
    return hamming.import_faiss()[1]


# ----------------------------------------------------------------------------------------------
# subkern info
# ----------------------------------------------------------------------------------------------


def test_info_text_mentions_every_op_and_device(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert f"{op}  " in out or f"{op} on cpu" in out
        assert f"{op} on cpu: reference: available" in out
    assert f"torch {torch.__version__}" in out
    assert "subkern._C:" in out
    assert "active cpu isa:" in out
    assert "cuda" in out


def test_info_reports_the_gpu_matmul_strategy(monkeypatch, capsys):
    monkeypatch.delenv("SUBKERN_GPU_MATMUL", raising=False)
    assert environment.collect()["gpu_matmul_strategy"] == "auto (CUDA: materialize)"
    monkeypatch.setenv("SUBKERN_GPU_MATMUL", "fused")
    assert environment.collect()["gpu_matmul_strategy"] == "fused"
    monkeypatch.setenv("SUBKERN_GPU_MATMUL", "tiles")
    assert cli.main(["info"]) == 0      # a bad value is reported, not raised
    out = capsys.readouterr().out
    assert ("gpu training matmul strategy (SUBKERN_GPU_MATMUL): invalid "
            "(SUBKERN_GPU_MATMUL must be one of auto, fused, materialize; got 'tiles')") in out


def test_info_json_has_op_table():
    info = environment.collect()
    rendered = json.loads(json.dumps(info))       # JSON-serialisable as is
    assert rendered["versions"]["subkern"] == subkern.__version__
    assert rendered["cpu"]["logical_cores"] == os.cpu_count()
    pairs = {(entry["op"], entry["device"]) for entry in rendered["ops"]}
    assert pairs == {(op, dev) for op in OPS for dev in ("cpu", "cuda")}
    for entry in rendered["ops"]:
        assert set(entry["backends"]) == set(OPS[entry["op"]])
        if entry["device"] == "cpu":
            assert entry["auto"] in OPS[entry["op"]]
            assert entry["backends"]["reference"] is None
            # every unavailable backend says why
            assert all(isinstance(why, str) and why for why in entry["backends"].values()
                       if why is not None)
    if not torch.cuda.is_available():
        cuda_rows = [entry for entry in rendered["ops"] if entry["device"] == "cuda"]
        assert all(entry["auto"] is None and entry["device_reason"] for entry in cuda_rows)


def test_info_json_flag_and_entry_point():
    # a fresh interpreter, as the console script runs it
    proc = subprocess.run([sys.executable, "-m", "subkern.cli", "info", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert {entry["op"] for entry in info["ops"]} == set(OPS)
    assert info["build"]["ext_loaded"] == (subkern._ext.load_error() is None)


# ----------------------------------------------------------------------------------------------
# subkern bench
# ----------------------------------------------------------------------------------------------


def test_bench_tiny_end_to_end(tmp_path, capsys):
    status = cli.main(["bench", "--size", "tiny", "--device", "cpu", "--out", str(tmp_path),
                       "--threads", "2", "--cpu-isa", "all"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "subkern bench wall time:" in out
    report = json.loads((tmp_path / "hamming_cpu_tiny.json").read_text())
    png = (tmp_path / "hamming_cpu_tiny.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["device"] == "cpu" and report["size"] == "tiny" and report["ok"] is True
    assert report["threads"]["torch"] == 2
    assert report["machine"]["versions"]["torch"] == torch.__version__
    assert report["date"] and report["errors"] == []
    rows = report["rows"]
    cpp_reason = subkern.backend.unavailable_reason("cpp", torch.device("cpu"))
    if cpp_reason is not None:
        assert not rows
        assert any(cpp_reason in skip["reason"] for skip in report["skipped"])
        return
    assert rows and all(row["match"] is True for row in rows)
    cases = {(row["params"]["bits"], row["params"]["k"]) for row in rows}
    assert cases == set(hamming.size_for("cpu", "tiny").cases)
    rivals = {row["rival"] for row in rows}
    assert hamming.REFERENCE_NAME in rivals
    if _faiss_reason() is None:
        assert hamming.FAISS_NAME in rivals
        faiss_rows = [row for row in rows if row["rival"] == hamming.FAISS_NAME]
        assert all(row["speedup"] > 0 and row["ours_per_s"] > 0 for row in faiss_rows)
        assert any(row["target"] == 3.0 for row in faiss_rows)   # 64 bits, k = 10
    else:
        assert any("faiss" in skip["what"].lower() for skip in report["skipped"])
    # every case has raw timings for each implementation
    impls = {(m["case"], m["impl"]) for m in report["measurements"]}
    for row in rows:
        assert (row["case"], row["ours"]) in impls and (row["case"], row["rival"]) in impls
    module = subkern._ext.extension()
    if module is not None and not environment.native_kernel_missing("hamming_topk", "cpp"):
        supported = [isa for isa in ("avx512", "avx2", "portable")
                     if not any(f"ISA {isa}" in skip["what"] for skip in report["skipped"])]
        assert len({row["ours"] for row in rows}) == len(supported)


def test_bench_mismatch_is_loud_and_fails(tmp_path, capsys, monkeypatch):
    if subkern.backend.unavailable_reason("cpp", torch.device("cpu")) is not None:
        pytest.skip("no cpp backend: there are no 'ours' rows to corrupt")
    real = hamming.subkern_topk

    def corrupted(backend):
        fn = real(backend)
        if backend == "reference":
            return fn

        def wrong(queries, database, k):
            distances, indices = fn(queries, database, k)
            return distances, indices.flip(1)      # right distances, indices in the wrong slots
        return wrong

    monkeypatch.setattr(hamming, "subkern_topk", corrupted)
    status = cli.main(["bench", "--size", "tiny", "--device", "cpu", "--out", str(tmp_path),
                       "--no-plot"])
    captured = capsys.readouterr()
    assert status == 1
    assert "!!! MISMATCH" in captured.out and "!!! MISMATCH" in captured.err
    report = json.loads((tmp_path / "hamming_cpu_tiny.json").read_text())
    assert report["ok"] is False
    assert all(row["match"] is False for row in report["rows"] if row["params"]["k"] > 1)


def test_bench_labels_a_missing_cpp_kernel(tmp_path, capsys, monkeypatch):
    # _C loaded but without a C++ kernel for the op: the dispatcher would run the reference, so
    # "ours" is labelled cpp(ref) and timed on a prefix of the queries like the reference
    if subkern.backend.unavailable_reason("cpp", torch.device("cpu")) is not None:
        pytest.skip("no cpp backend at all: nothing to label")
    real = environment.native_kernel_missing
    monkeypatch.setattr(environment, "native_kernel_missing",
                        lambda op, backend: backend == "cpp" or real(op, backend))
    status = cli.main(["bench", "--size", "tiny", "--device", "cpu", "--out", str(tmp_path),
                       "--no-plot", "--ops", "hamming"])
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads((tmp_path / "hamming_cpu_tiny.json").read_text())
    assert report["rows"] and {row["ours"] for row in report["rows"]} == {"cpp(ref)"}
    assert any("no C++ kernel" in note for note in report["notes"])
    assert "note: subkern._C has no C++ kernel" in out
    assert all(row["match"] for row in report["rows"])


def test_bench_cuda_without_device_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(environment, "cuda_unavailable_reason", lambda: "no GPU in this test")
    assert cli.main(["bench", "--device", "cuda", "--size", "tiny"]) == 2
    assert "no GPU in this test" in capsys.readouterr().err


def test_bench_rejects_unknown_family(capsys):
    assert cli.main(["bench", "--device", "cpu", "--size", "tiny", "--ops", "nope"]) == 2
    assert "unknown benchmark family" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the benchmark's correctness checks
# ----------------------------------------------------------------------------------------------


def _tied_data():
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(0, 256, (40, 4), dtype=torch.uint8, generator=gen)
    database = torch.cat([base, base, base])           # every code three times: many ties
    queries = torch.randint(0, 256, (7, 4), dtype=torch.uint8, generator=gen)
    return queries, database


def test_checks_accept_a_correct_topk_and_tie_permutations():
    queries, database = _tied_data()
    k = 5
    with subkern.use_backend("reference"):
        d, i = subkern.hamming_topk(queries, database, k)
    assert hamming.check_valid(queries, database, d, i, k) is None
    # another valid choice among the codes tied at the k-th distance (as FAISS may return)
    alt_i = i.clone()
    for row in range(queries.shape[0]):
        kth = int(d[row, -1])
        tied = [j for j in range(database.shape[0])
                if int(hamming.recompute_distances(queries[row:row + 1], database,
                                                   torch.tensor([[j]]))[0, 0]) == kth]
        chosen = [j for j in i[row].tolist() if j in tied]
        others = [j for j in tied if j not in chosen]
        if others:
            alt_i[row, -1] = others[-1]
    assert not torch.equal(alt_i, i)
    assert hamming.check_against_faiss(d, i, d, alt_i) is None
    assert hamming.check_identical(d, i, d, alt_i, "other") is not None


def test_checks_reject_wrong_results():
    queries, database = _tied_data()
    k = 6
    with subkern.use_backend("reference"):
        d, i = subkern.hamming_topk(queries, database, k)
    bad_d = d.clone()
    bad_d[2, 0] += 1
    assert hamming.check_valid(queries, database, bad_d, i, k) is not None
    assert hamming.check_against_faiss(bad_d, i, d, i) is not None
    dup_i = i.clone()
    dup_i[1, 1] = dup_i[1, 0]
    assert hamming.check_valid(queries, database, d, dup_i, k) is not None
    # an index strictly better than the k-th distance swapped for a code at another distance
    far = torch.argmax(hamming.recompute_distances(
        queries[:1], database, torch.arange(database.shape[0])[None]))
    wrong_i = i.clone()
    wrong_i[0, 0] = far
    assert hamming.check_against_faiss(d, wrong_i, d, i) is not None
    assert hamming.check_valid(queries, database, d, wrong_i, k) is not None
    # missing slots (k > database size) hold 2**31-1 / -1
    d_all, i_all = subkern.hamming_topk(queries, database[:3], 5)
    assert hamming.check_valid(queries, database[:3], d_all, i_all, 5) is None


def test_recompute_distances_matches_hamming_distance():
    queries, database = _tied_data()
    full = subkern.hamming_distance(queries, database).long()
    idx = torch.randint(0, database.shape[0], (queries.shape[0], 9))
    idx[0, 3] = -1
    got = hamming.recompute_distances(queries, database, idx)
    expected = torch.gather(full, 1, idx.clamp(min=0))
    expected[0, 3] = -1
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------
# harness pieces
# ----------------------------------------------------------------------------------------------


def test_gpu_peaks_from_properties_and_table():
    h100 = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132,
                                 clock_rate=1_980_000, memory_clock_rate=2_619_000,
                                 memory_bus_width=5120)
    peaks = harness.gpu_peaks(h100)
    assert peaks["bandwidth_Bps"] == pytest.approx(2 * 2.619e9 * 5120 / 8)     # 3.35 TB/s
    assert peaks["popc_per_s"] == pytest.approx(132 * 16 * 1.98e9)
    # no clocks exposed: the table by name
    bare = types.SimpleNamespace(name="NVIDIA H100 PCIe", multi_processor_count=114)
    peaks = harness.gpu_peaks(bare)
    assert peaks["bandwidth_Bps"] == pytest.approx(2.0e12)
    assert peaks["popc_per_s"] == pytest.approx(114 * 16 * 1.755e9)
    assert harness.gpu_peaks(types.SimpleNamespace(name="NVIDIA H200", multi_processor_count=132)
                             )["bandwidth_Bps"] == pytest.approx(4.8e12)
    unknown = harness.gpu_peaks(types.SimpleNamespace(name="Mystery", multi_processor_count=10))
    assert unknown["bandwidth_Bps"] is None and unknown["popc_per_s"] is None
    assert harness.roofline_seconds(1.0, 1.0, unknown) is None


def test_roofline_of_the_issue_case():
    n, nq, k = 1_280_000, 10_000, 10
    nbytes_, popcounts = hamming.roofline_inputs(n, nq, 8, k)
    assert nbytes_ == n * 8 + nq * 8 + nq * k * 12
    assert popcounts == nq * n * 2                       # two 32-bit popcounts per 64-bit pair
    peaks = {"bandwidth_Bps": 3.35e12, "popc_per_s": 132 * 16 * 1.98e9}
    t_min = harness.roofline_seconds(nbytes_, popcounts, peaks)
    assert t_min == pytest.approx(popcounts / peaks["popc_per_s"])     # compute bound
    assert t_min == pytest.approx(6.12e-3, rel=1e-2)


def test_peak_extra_memory_sees_a_large_allocation():
    def allocate():
        buf = torch.ones(64 << 20, dtype=torch.uint8)   # 64 MiB, touched
        return int(buf[::4096].sum())

    peak, method = harness.peak_extra_memory(allocate, "cpu")
    if sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs"):
        assert peak is not None and peak >= 48 << 20, (peak, method)
    else:
        assert peak is None and method.startswith("not measured")


def test_compare_scales_a_prefix_per_item():
    ours = harness.Measurement("ours", items=100, times_s=[0.010, 0.012, 0.011])
    rival = harness.Measurement("rival", items=10, times_s=[0.050])
    row = harness.compare(family="f", device="cpu", case="c", params={}, items=100, ours=ours,
                          rival=rival, stat="best", match=True, match_detail="ok", target=3.0)
    assert row.rival_s == pytest.approx(0.5) and row.ours_s == pytest.approx(0.010)
    assert row.speedup == pytest.approx(50.0) and row.target_met is True
    assert row.rival_extrapolated and not row.ours_extrapolated
    table = harness.format_table([row])
    assert "~500" in table and "50.00x" in table and "3x ok" in table
    median = harness.compare(family="f", device="cpu", case="c", params={}, items=100, ours=ours,
                             rival=rival, stat="median", match=False, match_detail="x")
    assert median.ours_s == pytest.approx(0.011) and "NO" in harness.format_table([median])


def test_gpu_case_flow_driven_on_cpu():
    # the CUDA cases' code path (rows vs the reference, backend pair, roofline efficiency), run on
    # CPU tensors with the cpp and reference backends standing in for cuda and triton
    if subkern.backend.unavailable_reason("cpp", torch.device("cpu")) is not None:
        pytest.skip("no cpp backend to stand in for the GPU backends")
    h100 = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132)
    config = harness.BenchConfig(device="cpu", size="tiny", threads=2, reps=1,
                                 log=lambda msg: None)
    size = hamming.size_for("cuda", "tiny")
    result = harness.BenchResult("hamming", "cpu", "tiny")
    hamming._run_accelerator(config, size, result, device="cpu", backends=("cpp", "reference"),
                             props=h100)
    assert result.errors == [] and result.ok
    assert result.params["gpu_peaks"]["bandwidth_Bps"] == pytest.approx(3.35e12)
    assert len(result.rows) == 3 * len(size.cases)
    for row in result.rows:
        assert row.match and row.roofline_s is not None and 0 < row.efficiency
        nbytes_, popcounts = hamming.roofline_inputs(size.n, size.nq, 8, row.params["k"])
        assert row.roofline_s == pytest.approx(
            harness.roofline_seconds(nbytes_, popcounts, result.params["gpu_peaks"]))
    pairs = {(row.ours, row.rival) for row in result.rows}
    assert pairs == {("cpp", hamming.REFERENCE_NAME), ("reference", hamming.REFERENCE_NAME),
                     ("cpp", "reference")}


def test_output_stem_and_slow_query_budget():
    assert harness.output_stem("hamming", "cpu", "full") == "hamming_cpu"
    assert harness.output_stem("hamming", "cuda", "quick") == "hamming_cuda_quick"
    size = hamming.size_for("cpu", "full")
    assert 1 <= hamming.slow_query_count(size, 128) <= hamming.slow_query_count(size, 8) <= 100


# ----------------------------------------------------------------------------------------------
# subkern train str
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """The tiny digits network trains fastest on one intra-op thread (even on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_train_str_prints_budget_checkpoints_and_resumes(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    common = ["train", "str", "--epochs", "2", "--weight-decay", "3e-2", "--out", str(out),
              "--no-progress", "--device", "cpu"]
    assert cli.main([*common, "--stop-after", "1"]) == 0
    assert cli.main([*common, "--resume", str(out)]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "after 2 of 2 epochs" in text
    assert "linear.0" in text and "total" in text and "overall sparsity" in text
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "str" and result["history"][-1]["epoch"] == 2
    assert result["recipe"]["weight_decay"] == 3e-2 and (out / "budget.png").exists()


def test_train_str_dense_baseline_and_target(capsys, one_thread):
    assert cli.main(["train", "str", "--epochs", "1", "--dense-baseline", "--no-progress",
                     "--device", "cpu"]) == 0
    assert "dense baseline" in capsys.readouterr().out
    assert cli.main(["train", "str", "--epochs", "2", "--target-sparsity", "0.6",
                     "--per-channel", "--no-progress", "--device", "cpu"]) == 0
    assert "target sparsity 0.6" in capsys.readouterr().out


def test_train_str_bad_arguments_exit_2(tmp_path, capsys):
    assert cli.main(["train", "str", "--target-sparsity", "1.5", "--no-progress"]) == 2
    assert cli.main(["train", "str", "--data", "mnist", "--no-progress"]) == 2
    (tmp_path / "bad.pt").write_bytes(b"garbage, not a checkpoint: " * 4)
    assert cli.main(["train", "str", "--resume", str(tmp_path / "bad.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "target_sparsity" in err and "--data-dir" in err and "not a subkern checkpoint" in err
