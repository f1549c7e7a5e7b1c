"""Helpers shared by the benchmark scripts: environment report, statistics, JSON, quiet profiling.

Kept free of benchmark logic so that ``bench_lstm.py`` and ``train_adding.py`` describe the machine
and write their result files the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def ensure_lstm_ext_importable() -> None:
    """Make ``import lstm_ext`` work when the package is built in place but not installed.

    ``python benchmarks/bench_lstm.py`` puts ``benchmarks/`` on ``sys.path``, not the repository
    root, so an in-place build (``python setup.py build_ext --inplace``) would not be found. An
    installed lstm_ext always wins: the root is only added when nothing else provides the package.
    """
    if importlib.util.find_spec("lstm_ext") is None and (REPO_ROOT / "lstm_ext").is_dir():
        sys.path.insert(0, str(REPO_ROOT))


# On import, so that the scripts can simply `import lstm_ext` after importing this module.
ensure_lstm_ext_importable()


def silence_known_warnings() -> None:
    """Hide warnings that say nothing about the benchmark but flood the terminal.

    Entering ``torch.backends.mkldnn.flags`` warns about TF32 on Intel GPUs on every call.
    """
    warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN.*")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit() -> dict[str, Any]:
    """``git rev-parse HEAD`` of the repository and whether the working tree had changes."""

    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(device: str) -> dict[str, Any]:
    """Everything a reader needs to judge a result: machine, versions, threads, build, commit."""
    import torch

    import lstm_ext

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "cudnn_version": None,
        "lstm_ext": lstm_ext.__version__,
        "lstm_ext_build": dict(lstm_ext.build_info()),
        "git": git_commit(),
        "load_average": _load_average(),
    }
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        info["device_name"] = torch.cuda.get_device_name(index)
        info["cudnn_version"] = torch.backends.cudnn.version()
    return info


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def busy_machine_warning(env: dict[str, Any]) -> str | None:
    """A warning when other processes already keep the CPU busy, else None.

    On an oversubscribed machine a multi-threaded op waits at every barrier for a thread that is
    not scheduled; an op small enough to stay on one thread does not. Ratios then measure the
    machine's load as much as the code, and ``--threads 1`` gives steadier figures.
    """
    load = env.get("load_average")
    cores = env.get("cpu_count") or 1
    if not load or load[0] < 0.5 * cores:
        return None
    return (
        f"warning: load average {load[0]:.1f} on {cores} logical cores before starting: other "
        "processes compete for the CPU, so timings will be noisy and multi-threaded paths "
        "penalized (try --threads 1, or a quiet machine)"
    )


def format_environment(env: dict[str, Any]) -> str:
    """A few readable lines of :func:`environment`'s dict for the top of a report."""
    build = env["lstm_ext_build"]
    git = env["git"]
    commit = "unknown" if git["commit"] is None else git["commit"][:12]
    if git.get("dirty"):
        commit += " (uncommitted changes)"
    lines = [
        f"device      {env['device']}: {env['device_name']}",
        f"cpu         {env['cpu_model']} ({env['cpu_count']} logical cores), "
        f"torch threads {env['threads']}"
        + (f", load average {env['load_average'][0]:.1f}" if env.get("load_average") else ""),
        f"torch       {env['torch']}"
        + (f", CUDA {env['torch_cuda']}, cuDNN {env['cudnn_version']}" if env["torch_cuda"] else "")
        + f", oneDNN available: {env['mkldnn_available']}",
        f"lstm_ext    {env['lstm_ext']}, backends {','.join(build['backends'])}, "
        f"cpu path {build['cpu_capability']}, cuda archs {build['cuda_archs']}",
        f"git         {commit}",
        f"date        {env['date']}",
    ]
    return "\n".join(lines)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method, so 1-3 samples work) and range of ``samples``."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        q1 = q3 = ordered[0]
    else:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
    }


def _clean(value: Any) -> Any:
    """JSON-ready: tuples as lists; NaN/inf as null (JSON has neither); floats to 6 significant
    digits, which is beyond what any timing here resolves and keeps result files small."""
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def result_path(path: str | os.PathLike[str], env: dict[str, Any], prefix: str = "") -> Path:
    """``path`` itself, or for a folder (existing, or written with a trailing slash) a file in it
    named by device and date, as benchmarks/results/ keeps them: ``cpu-amd-epyc-2026-01-31.json``.
    """
    text = os.fspath(path)
    target = Path(text)
    if not (text.endswith(("/", os.sep)) or target.is_dir()):
        return target
    device = env["device"].split(":")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-") or "unknown"
    return target / f"{prefix}{device}-{slug}-{env['date'][:10]}.json"


_NUMBER = r"(?:-?[0-9][0-9.eE+-]*|null)"
_NUMBER_LIST = re.compile(rf"\[\s*({_NUMBER}(?:,\s*{_NUMBER})*)\s*\]")


def _one_line(match: re.Match[str]) -> str:
    return "[" + re.sub(r"\s+", " ", match.group(1)) + "]"


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (see :func:`_clean`), creating the parent folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(payload), indent=1, allow_nan=False)
    # One line per list of numbers (per-round times), not one line per number.
    text = _NUMBER_LIST.sub(_one_line, text)
    target.write_text(text + "\n", encoding="utf-8")


def require_matplotlib(option: str = "--plot") -> bool:
    """True if matplotlib can be imported; else print why ``option`` cannot work and return False.

    Checked before the benchmark starts, so a missing optional dependency does not cost a whole run.
    """
    if importlib.util.find_spec("matplotlib") is None:
        print(
            f"error: {option} needs matplotlib, which is not installed "
            "(it is optional: `pip install matplotlib`).",
            file=sys.stderr,
        )
        return False
    return True


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Lines Kineto prints on every profiler start and stop, unconditionally (KINETO_LOG_LEVEL does not
# silence them); they would interleave with the progress lines.
_PROFILER_NOISE = ("USDT:", "STAGE:")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Capture file descriptor 2 while profiling, then re-emit all but Kineto's banner lines.

    The banner is written by C++ straight to the descriptor, so redirecting ``sys.stderr`` does
    not catch it. Anything else written meanwhile (warnings, errors) is passed through.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines() if not line.startswith(_PROFILER_NOISE)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def select_device(text: str) -> tuple[Any, str | None]:
    """The device to run on (a torch.device), or an error message saying why it cannot be used."""
    import torch

    import lstm_ext  # importable: ensure_lstm_ext_importable() ran when this module loaded

    try:
        device = torch.device(text)
    except RuntimeError:
        return None, f"unknown device {text!r}: use cpu, cuda or cuda:<index>"
    if device.type == "cpu":
        return device, None
    if device.type != "cuda":
        return None, f"device {text!r} is not supported: use cpu, cuda or cuda:<index>"
    if not torch.cuda.is_available():
        return None, (
            f"--device {text} was requested, but torch sees no CUDA GPU (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Run on a machine "
            "with a GPU and a CUDA build of torch, or use --device cpu."
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        return None, f"--device {text}: only {torch.cuda.device_count()} GPU(s) visible"
    if "cuda" not in lstm_ext.compiled_backends():
        return None, (
            "--device cuda: this lstm_ext was built without its CUDA kernels "
            f"(build_info: {lstm_ext.build_info()}). Rebuild it where a CUDA toolkit is found."
        )
    return torch.device("cuda", index), None
