"""The benchmark scripts' code paths on tiny problems: arguments, JSON, correctness columns, plots.

No timing is asserted (machines are noisy); only that every figure is there, finite, and that
lstm_ext's results match the baselines'. Each run uses one round and tiny shapes.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = ["--seq-lens", "3", "--batch-sizes", "2", "--hidden-sizes", "4", "--reps", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str) -> ModuleType:
    """Import a script from benchmarks/ (a folder of scripts, not a package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("bench_lstm")


@pytest.fixture(scope="module")
def adding() -> ModuleType:
    return _load("train_adding")


def _assert_finite(value: Any, where: str = "payload") -> None:
    """Every number in a JSON document is finite (None stands for "not applicable")."""
    if isinstance(value, dict):
        for key, item in value.items():
            _assert_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _assert_finite(item, f"{where}[{index}]")
    elif isinstance(value, float):
        assert math.isfinite(value), where


def _run_bench(bench: ModuleType, tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "bench.json"
    code = bench.main([*argv, "--json", str(path)])
    return code, json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# bench_lstm.py


def test_bench_json_has_every_figure(bench: ModuleType, tmp_path: Path) -> None:
    code, payload = _run_bench(bench, tmp_path, *TINY, "--warmup", "1")
    assert code == 0
    _assert_finite(payload)
    assert payload["schema"] == bench.SCHEMA
    env = payload["env"]
    for key in ("device", "device_name", "cpu_model", "threads", "torch", "lstm_ext", "date"):
        assert env[key], key
    assert env["threads"] == torch.get_num_threads()
    assert "commit" in env["git"]
    assert env["lstm_ext_build"]["version"] == env["lstm_ext"]
    assert [case["mode"] for case in payload["results"]] == ["inference", "training"]
    for case in payload["results"]:
        assert case["shape"]["name"] == "T3 N2 C4 H4"
        variants = case["variants"]
        assert set(variants) == {
            "lstm_ext", "torch_onednn", "torch_native", "onnxruntime", "openvino", "reference"
        }
        for runtime in ("onnxruntime", "openvino"):
            if case["mode"] == "training":
                assert variants[runtime]["skipped"] == "inference only (a deployment runtime)"
            elif importlib.util.find_spec(runtime) is None:
                assert "is not installed" in variants[runtime]["skipped"]
            else:
                assert variants[runtime]["skipped"] is None, runtime
        for key, record in variants.items():
            assert record["error"] is None, (key, record["error"])
            if record["skipped"]:
                continue
            assert len(record["times_s"]) == 1 and record["times_s"][0] > 0
            assert record["stats_s"]["median"] > 0
            assert isinstance(record["peak_memory_bytes"], int)
            assert record["peak_memory_bytes"] >= 0
        assert "lstm_ext::lstm_forward" in variants["lstm_ext"]["ops"]
        timed = [key for key, record in variants.items() if record["times_s"]]
        assert set(case["speedup"]) == set(timed) - {"lstm_ext"}
        for speed in case["speedup"].values():
            assert speed["median"] > 0 and len(speed["ratios"]) == 1
        correctness = case["correctness"]
        assert correctness["correct"] is True
        assert set(correctness["comparisons"]) == set(timed) - {"lstm_ext"}
        for comparison in correctness["comparisons"].values():
            assert comparison["output_max_abs_diff"] < 1e-5
            assert comparison["within_tolerance"] is True
            if case["mode"] == "training":
                assert comparison["grad_max_abs_diff"] < 1e-5
                assert "grad_weight_hh_l0" not in comparison["per_tensor"]
                assert {"input", "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"} <= set(
                    comparison["per_tensor"]
                )
            else:
                assert comparison["grad_max_abs_diff"] is None


def test_bench_prints_table_and_environment(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main([*TINY, "--warmup", "0", "--modes", "inference"]) == 0
    out = capsys.readouterr().out
    for text in ("torch threads", "lstm_ext    0.", "median ms", "max|d| out", "T3 N2 C4 H4"):
        assert text in out


def test_bench_float64_layers_and_directions(bench: ModuleType, tmp_path: Path) -> None:
    code, payload = _run_bench(
        bench,
        tmp_path,
        *TINY,
        "--warmup",
        "0",
        "--dtype",
        "float64",
        "--layers",
        "2",
        "--bidirectional",
        "--modes",
        "training",
    )
    assert code == 0
    (case,) = payload["results"]
    assert case["shape"]["layers"] == 2 and case["shape"]["bidirectional"] is True
    onednn = case["variants"]["torch_onednn"]
    # oneDNN has no float64 LSTM: the variant is skipped if (and only if) torch did not use it.
    assert (onednn["skipped"] is not None) == ("aten::mkldnn_rnn_layer" not in onednn["ops"])
    comparison = case["correctness"]["comparisons"]["torch_native"]
    assert "weight_hh_l1_reverse" in comparison["per_tensor"]
    assert comparison["output_max_abs_diff"] < 1e-10
    assert comparison["grad_max_abs_diff"] < 1e-10


@pytest.mark.parametrize("cell", ["gru", "peephole", "cifg", "zoneout"])
def test_bench_cells(bench: ModuleType, tmp_path: Path, cell: str) -> None:
    # float64 so that the comparison is exact enough to catch a wrong cell; two layers,
    # bidirectional, so that the variants' per-layer parameters are all paired up.
    code, payload = _run_bench(
        bench, tmp_path, *TINY, "--warmup", "0", "--cell", cell, "--dtype", "float64",
        "--layers", "2", "--bidirectional",
    )
    assert code == 0
    assert payload["config"]["cell"] == cell
    for case in payload["results"]:
        assert case["variants"]["lstm_ext"]["error"] is None
        assert case["correctness"]["correct"] is True
        comparison = case["correctness"]["comparisons"]["reference"]
        assert comparison["output_max_abs_diff"] < 1e-10
        if case["mode"] == "training":
            assert comparison["grad_max_abs_diff"] < 1e-10
            if cell == "peephole":
                assert "peephole_l1_reverse" in comparison["per_tensor"]
        if cell == "gru":
            # torch.nn.GRU runs on torch's own path, compared too.
            assert case["correctness"]["comparisons"]["torch_native"]["output_max_abs_diff"] < 1e-10
        else:
            assert set(case["variants"]) <= {"lstm_ext", "reference", "reference_compiled"}


def test_bench_low_precision_run(bench: ModuleType, tmp_path: Path) -> None:
    code, payload = _run_bench(
        bench,
        tmp_path,
        *TINY,
        "--warmup",
        "0",
        "--dtype",
        "bfloat16",
        "--modes",
        "training",
        "--variants",
        "torch_native",
    )
    (case,) = payload["results"]
    error = case["variants"]["lstm_ext"]["error"]
    if error is not None:
        # A dtype lstm_ext has no kernel for is reported, not fatal, and fails the exit status.
        assert code == 1
        assert case["correctness"]["oracle"] is None
        return
    oracle = case["correctness"]["oracle"]
    assert oracle["against"] == "torch_native"
    assert set(oracle["errors"]) == {"lstm_ext", "torch_native"}
    assert code == (0 if case["correctness"]["correct"] else 1)


def test_low_precision_rule_against_float64(bench: ModuleType) -> None:
    """The fp16/bf16 verdict: lstm_ext's error from float64 at most 2x torch's, per group."""
    shape = bench.Shape(3, 2, 4, 4)
    work = bench.Workload(shape, torch.bfloat16, torch.device("cpu"), seed=0, training=True)
    names = work.tensor_names()
    torch_result = work.make_step(bench.CPU_BASELINES[1], "eager")()
    as_good = bench._correctness(
        work, {"lstm_ext": torch_result, "torch_native": torch_result}, names, torch.bfloat16
    )
    assert as_good["correct"] is True
    assert as_good["oracle"]["against"] == "torch_native"
    outputs, grads = torch_result
    worse = (tuple(t + 0.5 for t in outputs), grads)
    verdict = bench._correctness(
        work, {"lstm_ext": worse, "torch_native": torch_result}, names, torch.bfloat16
    )
    assert verdict["correct"] is False


def test_float32_beyond_tolerance_is_arbitrated_by_float64(bench: ModuleType) -> None:
    """float32 results that disagree beyond tolerance: lstm_ext passes only if it is no further
    from the float64 oracle than the baseline it disagrees with."""
    shape = bench.Shape(3, 2, 4, 4)
    work = bench.Workload(shape, torch.float32, torch.device("cpu"), seed=0, training=True)
    names = work.tensor_names()
    good = work.make_step(bench.CPU_BASELINES[1], "eager")()
    outputs, grads = good
    off = (tuple(t + 1e-3 for t in outputs), grads)
    # The baseline is the one that is off: lstm_ext, closer to float64, passes.
    verdict = bench._correctness(work, {"lstm_ext": good, "torch_native": off}, names,
                                 torch.float32)
    assert verdict["comparisons"]["torch_native"]["within_tolerance"] is False
    assert verdict["correct"] is True
    assert verdict["oracle"]["against"] == "torch_native"
    # lstm_ext is the one that is off: it fails.
    verdict = bench._correctness(work, {"lstm_ext": off, "torch_native": good}, names,
                                 torch.float32)
    assert verdict["correct"] is False


def test_bench_busy_runs_under_load_and_stops_it(bench: ModuleType, tmp_path: Path) -> None:
    started = []
    real_popen = bench.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    bench.subprocess.Popen = popen
    try:
        code, payload = _run_bench(bench, tmp_path, *TINY, "--warmup", "0", "--modes",
                                   "inference", "--busy", "1")
    finally:
        bench.subprocess.Popen = real_popen
    assert code == 0
    assert payload["config"]["busy"] == 1
    # (Other Popen calls are the environment's: git, uname.)
    load = [p for p in started if p.args[-1:] == ["while True: pass"]]
    assert len(load) == 1 and load[0].poll() is not None  # killed at the end


def test_bench_compile_variant_reports_compile_time(bench: ModuleType, tmp_path: Path) -> None:
    # The "eager" backend exercises the compile path without a C++ compiler's minutes.
    code, payload = _run_bench(
        bench,
        tmp_path,
        "--seq-lens",
        "2",
        "--batch-sizes",
        "1",
        "--hidden-sizes",
        "2",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--modes",
        "inference",
        "--compile",
        "--compile-backend",
        "eager",
        "--variants",
        "reference_compiled",
    )
    assert code == 0
    record = payload["results"][0]["variants"]["reference_compiled"]
    assert record["error"] is None
    assert record["compile_s"] > 0
    assert (
        payload["results"][0]["correctness"]["comparisons"]["reference_compiled"][
            "output_max_abs_diff"
        ]
        < 1e-5
    )


def test_bench_shape_selection(bench: ModuleType) -> None:
    parser = bench.build_parser()

    def shapes(*argv: str) -> list[str]:
        return [shape.name for shape in bench.resolve_shapes(parser.parse_args(argv), parser)[0]]

    assert shapes() == [bench.PRESETS[name].name for name in bench.DEFAULT_PRESETS]
    assert shapes("--shapes", "latency,10x2x3x4") == ["T50 N1 C128 H128", "T10 N2 C3 H4"]
    assert shapes("--seq-lens", "5", "--batch-sizes", "1,2") == [
        "T5 N1 C512 H512",
        "T5 N2 C512 H512",
    ]
    assert shapes("--shapes", "medium", "--layers", "2", "--bidirectional") == [
        "T100 N32 C256 H256 L2 bidir"
    ]
    sweep_shapes, sweep = bench.resolve_shapes(
        parser.parse_args(["--sweep", "--batch-sizes", "1,32", "--hidden-sizes", "64,256"]),
        parser,
    )
    assert sweep["batch"]["values"] == [1, 32] and sweep["hidden"]["values"] == [64, 256]
    assert len(sweep_shapes) == 3  # the centre N=32, H=256 is in both sweeps
    with pytest.raises(SystemExit):
        bench.resolve_shapes(parser.parse_args(["--shapes", "huge"]), parser)


def test_bench_sweep_plot(bench: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sweep.png"
    code, payload = _run_bench(
        bench,
        tmp_path,
        "--sweep",
        "--seq-lens",
        "2",
        "--batch-sizes",
        "1,2",
        "--hidden-sizes",
        "2,4",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--modes",
        "inference",
        "--variants",
        "reference",
        "--plot",
        str(plot),
    )
    assert code == 0
    assert payload["sweep"]["batch"]["values"] == [1, 2]
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_bench_plot(bench: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    assert bench.main([*TINY, "--warmup", "0", "--variants", "reference", "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_plot_without_matplotlib_fails_early(
    bench: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "matplotlib" else real_find_spec(name, *args),
    )
    assert bench.main([*TINY, "--plot", str(tmp_path / "x.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_cuda_without_gpu_is_a_clear_error(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main([*TINY, "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_bandwidth_reports_fractions(tmp_path: Path) -> None:
    bandwidth = _load("bench_bandwidth")
    path = tmp_path / "bw.json"
    argv = ["--batch-sizes", "1,2", "--hidden-sizes", "16", "--steps", "3", "--rounds", "2",
            "--json", str(path)]
    assert bandwidth.main(argv) == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["hidden"], r["batch"]) for r in rows] == [(16, 1), (16, 2)]
    for row in rows:
        assert row["weight_bytes"] == 4 * 16 * (16 + 16) * 4  # W_ih and W_hh, C = H
        assert row["read_bytes_per_s"] > 0
        expected = row["weight_bytes"] / row["read_bytes_per_s"]
        assert row["limit_s"] == pytest.approx(expected, rel=1e-4)  # JSON keeps 6 digits


def test_summarize_quartiles() -> None:
    utils = _load("_bench_utils")
    assert utils.summarize([2.0]) == {"median": 2.0, "q1": 2.0, "q3": 2.0, "min": 2.0, "max": 2.0}
    stats = utils.summarize([3.0, 1.0, 2.0])
    assert (stats["q1"], stats["median"], stats["q3"]) == (1.5, 2.0, 2.5)


def test_result_files_are_named_by_device_and_date(tmp_path: Path) -> None:
    utils = _load("_bench_utils")
    env = {"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "date": "2026-01-31T10:00"}
    assert utils.result_path(tmp_path, env).name == "cuda-nvidia-h100-80gb-hbm3-2026-01-31.json"
    assert utils.result_path(tmp_path / "x.json", env) == tmp_path / "x.json"
    utils.write_json(tmp_path / "r.json", {"nan": float("nan"), "t": (1.23456789, 2)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"nan": None, "t": [1.23457, 2]}


# ------------------------------------------------------------------------------------------------
# train_adding.py

TINY_ADDING = [
    "--seq-len",
    "6",
    "--batch-size",
    "4",
    "--hidden-size",
    "8",
    "--steps",
    "5",
    "--eval-size",
    "8",
    "--log-every",
    "2",
    "--check-steps",
    "5",
]


def test_adding_batch_has_two_markers(adding: ModuleType) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs, targets = adding.adding_batch(generator, 10, 16, torch.device("cpu"), torch.float64)
    assert inputs.shape == (10, 16, 2) and targets.shape == (16,)
    markers = inputs[:, :, 1]
    assert torch.equal(markers.sum(0), torch.full((16,), 2.0, dtype=torch.float64))
    assert torch.equal(markers[:5].sum(0), torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close((inputs[:, :, 0] * markers).sum(0), targets)


def test_train_adding_json(adding: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "adding.json"
    assert adding.main([*TINY_ADDING, "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    _assert_finite(payload)
    assert payload["schema"] == adding.SCHEMA
    # The LSTM pair, the tanh RNN, and by default every other cell.
    assert set(payload["losses"]) == {"torch", "lstm_ext", "rnn", *adding.EXTRA_CELLS}
    assert all(len(curve) == 5 for curve in payload["losses"].values())
    # Same weights, same batches: the first loss is the same computation on both.
    assert payload["losses"]["lstm_ext"][0] == pytest.approx(
        payload["losses"]["torch"][0], abs=1e-6
    )
    agreement = payload["summary"]["loss_agreement"]
    assert agreement["ok"] is True
    assert agreement["max_abs_diff_checked"] < 1e-4
    for record in payload["summary"]["models"].values():
        assert record["step_ms"]["median"] > 0
        assert record["eval_mse"] >= 0
    assert payload["summary"]["speedup_vs_torch"]["median"] > 0
    assert payload["env"]["threads"] > 0


def test_train_adding_cells_option(adding: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "adding.json"
    assert adding.main([*TINY_ADDING, "--no-rnn", "--cells", "gru,cifg", "--json", str(path)]) == 0
    assert set(json.loads(path.read_text())["losses"]) == {"torch", "lstm_ext", "gru", "cifg"}
    with pytest.raises(SystemExit):
        adding.main([*TINY_ADDING, "--cells", "gru,transformer"])


def test_train_adding_divergence_fails(adding: ModuleType) -> None:
    # A negative tolerance cannot be met: the script must say so through its exit status.
    assert adding.main([*TINY_ADDING, "--no-rnn", "--tolerance", "-1"]) == 1


def test_train_adding_plot(adding: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "adding.png"
    assert adding.main([*TINY_ADDING, "--no-rnn", "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_train_adding_cuda_without_gpu_is_a_clear_error(
    adding: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert adding.main([*TINY_ADDING, "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_profile_lstm_reports_every_phase(capsys):
    profile = _load("profile_lstm")
    code = profile.main(["--seq-len", "3", "--batch", "2", "--hidden", "8", "--steps", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    for label in profile.PHASES.values():
        line = next(row for row in printed.splitlines() if row.startswith(label))
        milliseconds = float(line[len(label) :].split()[0])
        assert milliseconds > 0, line
    assert "whole step" in printed


def test_bench_func_reports_every_workload(tmp_path: Path) -> None:
    bench_func = _load("bench_func")
    path = tmp_path / "func.json"
    argv = ["--shape", "3,2,4,5", "--samples", "3", "--rounds", "1", "--warmup", "0"]
    assert bench_func.main([*argv, "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    _assert_finite(payload)
    assert set(payload["results"]) == {
        "per-sample gradients",
        "gradient penalty (double backward)",
        "vmap inference over B batches",
    }
    for title, report in payload["results"].items():
        for name, entry in report.items():
            # Every variant computes what torch computes.
            assert entry["max_abs_diff_from_torch"] < 1e-5, (title, name)
            assert entry["ms"]["median"] > 0
        assert next(iter(report)).startswith("lstm_ext")


def test_bench_runtime_variant_without_its_package_is_skipped_clearly(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.RUNTIME_PACKAGES, "openvino", "no_such_runtime_package")
    argv = [*TINY, "--warmup", "0", "--modes", "inference", "--variants", "openvino"]
    code, payload = _run_bench(bench, tmp_path, *argv)
    assert code == 0
    skipped = payload["results"][0]["variants"]["openvino"]["skipped"]
    assert skipped == (
        "no_such_runtime_package is not installed (optional: pip install no_such_runtime_package)"
    )


def test_bench_grid_reports_best_peer_per_point(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2 x 2 x 2 grid instead of the real one (48 shapes): the same code path in seconds.
    monkeypatch.setattr(bench, "GRID_SEQ_LENS", (1, 3))
    monkeypatch.setattr(bench, "GRID_BATCHES", (1, 2))
    monkeypatch.setattr(bench, "GRID_HIDDENS", (4, 5))
    assert [s.name for s in bench.grid_shapes()] == [
        "T1 N1 C4 H4", "T1 N1 C5 H5 L2", "T3 N2 C4 H4 L2", "T3 N2 C5 H5"
    ]
    code, payload = _run_bench(bench, tmp_path, "--grid", "--reps", "1", "--warmup", "0")
    assert code == 0
    _assert_finite(payload)
    assert "reference" not in payload["config"]["variants"]
    assert payload["config"]["target_time"] == bench.GRID_TARGET_SECONDS
    grid = payload["grid"]
    assert set(grid) == {"inference", "training"}
    for mode, part in grid.items():
        assert len(part["points"]) == 4
        for point in part["points"]:
            case = next(
                c for c in payload["results"]
                if c["shape"]["name"] == point["shape"] and c["mode"] == mode
            )
            # The best peer is the fastest non-reference variant: the smallest paired speedup.
            assert point["speedup"] == min(v["median"] for v in case["speedup"].values())
            if mode == "training":
                assert point["best_peer"] in ("torch_onednn", "torch_native")
        assert part["min_speedup"] == min(p["speedup"] for p in part["points"])
        assert part["below_1x"] == [p["shape"] for p in part["points"] if p["speedup"] < 1.0]
    if importlib.util.find_spec("matplotlib") is not None:
        plot = tmp_path / "grid.png"
        assert bench.main(["--grid", "--reps", "1", "--warmup", "0", "--plot", str(plot)]) == 0
        assert plot.read_bytes()[:8] == PNG_MAGIC


def test_bench_grid_refuses_shape_options(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--grid", "--shapes", "large"])
