"""The CPU cache of large buffers (csrc/cpu/large_buffers.h): reuse, release, profiler accounting.

Buffers of 16 MiB and more (saved gates, gradients of the gates) come from blocks kept between op
calls; these tests use a layer whose gate buffer is 4 * 512 * 4 bytes * T * N = 32 MiB.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import lstm_ext

T, N, H = 64, 64, 512
GATE_BYTES = T * N * 4 * H * 4  # float32


def _train_step(model, x):
    output, (h, c) = model(x)
    (output.sum() + c.sum()).backward()
    return output.detach(), x.grad.clone()


def test_reused_blocks_give_identical_results():
    torch.manual_seed(0)
    model = lstm_ext.LSTM(H, H)
    x = torch.randn(T, N, H, requires_grad=True)
    lstm_ext.empty_cpu_cache()
    first = _train_step(model, x)
    x.grad = None
    # The second step runs on the blocks the first one freed (stale contents must not matter).
    second = _train_step(model, x)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_cpu_cache_releases_idle_blocks():
    model = lstm_ext.LSTM(H, H)
    x = torch.randn(T, N, H, requires_grad=True)
    _train_step(model, x)
    released = lstm_ext.empty_cpu_cache()
    # Saved gates and their gradient: two blocks of at least the gate buffer's size.
    assert released >= 2 * GATE_BYTES
    assert lstm_ext.empty_cpu_cache() == 0


def test_profiler_sees_cached_blocks():
    model = lstm_ext.LSTM(H, H)
    x = torch.randn(T, N, H, requires_grad=True)
    _train_step(model, x)  # fill the cache: the profiled call takes idle blocks
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        output, _ = model(x)
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert allocated >= GATE_BYTES, "the saved gates must count as allocated memory"
    del output


def test_cache_can_be_turned_off():
    script = (
        "import torch, lstm_ext\n"
        f"m = lstm_ext.LSTM({H}, {H}); x = torch.randn({T}, {N}, {H}, requires_grad=True)\n"
        "o, _ = m(x); o.sum().backward()\n"
        "print(lstm_ext.empty_cpu_cache())\n"
    )
    env = {**os.environ, "LSTM_EXT_CPU_CACHE_MB": "0"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=pathlib.Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "0"
