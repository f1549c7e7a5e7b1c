"""Where one training step of lstm_ext.LSTM spends its time, against the GEMM rate of this machine.

Runs forward + backward of one layer under torch.profiler and groups the time by lstm_ext's named
phases (input projection, forward recurrence, backward recurrence, weight gradients) and by what is
left (autograd, allocation, Python). Each phase's GEMM FLOPs divided by its time gives its achieved
rate, printed beside the rate of a large ATen GEMM (MKL) and the FMA peak measured here, so the
distance to the machine's limit is visible.

    python benchmarks/profile_lstm.py                      # T=100, N=64, C=H=512, fp32
    python benchmarks/profile_lstm.py --batch 32 --hidden 256 --threads 1

Shapes: T time, N batch, C input size, H hidden size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

# _bench_utils also makes an in-place build of lstm_ext importable, so it comes before lstm_ext.
import _bench_utils  # noqa: F401
import torch
from torch.profiler import ProfilerActivity, profile

import lstm_ext

PHASES = {
    "lstm_ext::input_projection": "forward: input projection GEMM",
    "lstm_ext::recurrence": "forward: recurrence (GEMM + gate math per step)",
    "lstm_ext::recurrence_backward": "backward: recurrence (gate math + GEMM per step)",
    "lstm_ext::weight_gradients": "backward: dX, dW_ih, dW_hh GEMMs, db",
}


def phase_flops(steps: int, batch: int, features: int, hidden: int) -> dict[str, float]:
    """GEMM FLOPs of each phase (pointwise work is not counted)."""
    rows = steps * batch
    return {
        "lstm_ext::input_projection": 2.0 * rows * features * 4 * hidden,
        "lstm_ext::recurrence": 2.0 * rows * hidden * 4 * hidden,
        "lstm_ext::recurrence_backward": 2.0 * rows * 4 * hidden * hidden,
        "lstm_ext::weight_gradients": 2.0 * rows * 4 * hidden * (2 * features + hidden),
    }


def reference_gemm_rate(size: int = 1024, reps: int = 5) -> float:
    """GFLOP/s of a large square ATen GEMM on this machine with the current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=None, help="default: hidden size")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3, help="profiled training steps")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, batch, hidden = args.seq_len, args.batch, args.hidden
    features = args.input_size or hidden

    lstm = lstm_ext.LSTM(features, hidden)
    x = torch.randn(steps, batch, features, requires_grad=True)

    def train_step() -> None:
        output, _ = lstm(x)
        output.sum().backward()

    for _ in range(2):
        train_step()
    wall = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            start = time.perf_counter()
            train_step()
            wall.append(time.perf_counter() - start)

    phase_us: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key in PHASES:
            phase_us[event.key] += event.cpu_time_total
    per_step_ms = statistics.median(wall) * 1e3
    flops = phase_flops(steps, batch, features, hidden)
    labels = dict(PHASES)
    if phase_us["lstm_ext::input_projection"] == 0:
        # From batch 16 on, the CPU float32 path computes each step's input projection inside
        # the recurrence: its FLOPs belong to that phase.
        flops["lstm_ext::recurrence"] += flops.pop("lstm_ext::input_projection")
        del labels["lstm_ext::input_projection"]
        labels["lstm_ext::recurrence"] = "forward: recurrence, input projection fused in"
    gemm_rate = reference_gemm_rate()

    print(f"lstm_ext {lstm_ext.__version__} {lstm_ext.build_info()['cpu_capability']}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"T={steps} N={batch} C={features} H={hidden} float32, one training step "
          f"(median of {args.steps}, under the profiler): {per_step_ms:.1f} ms")
    print(f"reference: 1024^3 ATen GEMM {gemm_rate:.0f} GFLOP/s\n")
    print(f"{'phase':52s} {'ms':>8s} {'share':>6s} {'GFLOP/s':>8s}")
    accounted = 0.0
    for key, label in labels.items():
        ms = phase_us[key] / 1e3 / args.steps
        accounted += ms
        rate = flops[key] / (ms / 1e3) / 1e9 if ms > 0 else float("nan")
        print(f"{label:52s} {ms:8.3f} {ms / per_step_ms:6.0%} {rate:8.0f}")
    rest = per_step_ms - accounted
    print(f"{'rest: autograd, allocation, bias, Python':52s} {rest:8.1f} {rest / per_step_ms:6.0%}")
    total_rate = sum(flops.values()) / (per_step_ms / 1e3) / 1e9
    whole = "whole step (GEMM FLOPs / wall time)"
    print(f"{whole:52s} {per_step_ms:8.1f} {1:6.0%} {total_rate:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
