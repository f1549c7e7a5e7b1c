"""Every CPU instruction-set path against torch.nn.LSTM, each in its own process.

The kernel set is chosen once per process (LSTM_EXT_CPU_CAPABILITY caps it), so each path runs in a
subprocess: DEFAULT (portable vectors, ATen GEMMs), AVX2 and AVX512 (fused float32 step over packed
weights, packed GEMMs) where this CPU has them.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

PARITY_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import lstm_ext

    torch.manual_seed(0)
    print(lstm_ext.build_info()["cpu_capability"])
    cases = [
        # (T, N, C, H, layers, bidirectional, batch_first, bias)
        (5, 3, 6, 13, 2, True, False, True),
        (4, 7, 5, 37, 1, False, True, True),
        (3, 2, 9, 64, 2, True, True, False),
        (6, 13, 16, 16, 1, False, False, True),
        (2, 1, 3, 5, 1, False, False, True),
        # K = C = 1100 and K = H = 1030 exceed the packed GEMM's K block (1024), as does the
        # backward's K = 4H; 65 panels of W_hh are split between threads.
        (3, 2, 1100, 1030, 1, True, False, True),
        # From N = 16 on, the AVX paths compute each step's input projection inside the
        # recurrence (with K = C + H in registers): ragged row tiles, a backward K = 4H beyond
        # the K block, no bias.
        (4, 17, 600, 520, 1, True, False, True),
        (3, 16, 9, 40, 2, True, True, False),
        # T = 1 runs on the weights as stored (SingleStepFloatBackend) up to 24 rows on AVX-512
        # and 48 on AVX2, ragged tiles and K tails included; beyond, on ATen's GEMMs.
        (1, 1, 40, 37, 2, True, False, True),
        (1, 7, 9, 130, 1, False, False, False),
        (1, 12, 600, 520, 1, True, True, True),
        (1, 24, 33, 64, 2, False, False, True),
        (1, 25, 33, 64, 1, False, False, True),
        (1, 48, 17, 40, 1, False, False, True),
        (1, 49, 17, 40, 1, False, False, True),
    ]
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
        for T, N, C, H, L, bi, bf, bias in cases:
            config = dict(bias=bias, batch_first=bf, bidirectional=bi, dtype=dtype)
            theirs = torch.nn.LSTM(C, H, L, **config)
            ours = lstm_ext.LSTM(C, H, L, **config)
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn((N, T, C) if bf else (T, N, C), dtype=dtype, requires_grad=True)
            D = 2 if bi else 1
            h0 = torch.randn(L * D, N, H, dtype=dtype, requires_grad=True)
            c0 = torch.randn(L * D, N, H, dtype=dtype, requires_grad=True)
            results = []
            for m in (theirs, ours):
                out, (h, c) = m(x, (h0, c0))
                loss = out.square().sum() + 2 * h.sum() + c.square().sum()
                grads = torch.autograd.grad(loss, [x, h0, c0, *m.parameters()])
                results.append((out, h, c, *grads))
            for e, a in zip(*results):
                torch.testing.assert_close(a, e, rtol=tol, atol=tol)
            with torch.no_grad():
                torch.testing.assert_close(ours(x, (h0, c0))[0], theirs(x, (h0, c0))[0],
                                           rtol=tol, atol=tol)
    # Projections and packed batches (the fused path's W_hh is [4H, P]; packed steps shrink).
    from torch.nn.utils.rnn import pack_padded_sequence
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
        for P, packed in ((5, False), (0, True), (3, True)):
            theirs = torch.nn.LSTM(6, 21, 2, bidirectional=True, proj_size=P, dtype=dtype)
            ours = lstm_ext.LSTM(6, 21, 2, bidirectional=True, proj_size=P, dtype=dtype)
            ours.load_state_dict(theirs.state_dict())
            padded = torch.randn(7, 5, 6, dtype=dtype, requires_grad=True)
            results = []
            for m in (theirs, ours):
                x = padded
                if packed:
                    x = pack_padded_sequence(padded, [7, 3, 6, 1, 7], enforce_sorted=False)
                out, (h, c) = m(x)
                out = out.data if packed else out
                loss = out.square().sum() + 2 * h.sum() + c.square().sum()
                results.append((out, h, c, *torch.autograd.grad(loss, [padded, *m.parameters()])))
            for e, a in zip(*results):
                torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    # The GRU's single step (SingleStepFloatBackend: the n gate's input and recurrent halves kept
    # apart) up to its largest batch (24 rows on AVX-512, 32 on AVX2) and beyond, and GRUCell,
    # with and without biases.
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
        for N, C, H, bias in ((1, 40, 37, True), (7, 9, 130, False), (24, 33, 64, True),
                              (25, 5, 20, True), (32, 11, 24, True), (33, 11, 24, False)):
            theirs = torch.nn.GRU(C, H, 2, bias=bias, dtype=dtype)
            ours = lstm_ext.GRU.from_torch(theirs)
            x = torch.randn(1, N, C, dtype=dtype, requires_grad=True)
            h0 = torch.randn(2, N, H, dtype=dtype, requires_grad=True)
            results = []
            for m in (theirs, ours):
                out, h = m(x, h0)
                loss = out.square().sum() + 2 * h.sum()
                results.append((out, h, *torch.autograd.grad(loss, [x, h0, *m.parameters()])))
            for e, a in zip(*results):
                torch.testing.assert_close(a, e, rtol=tol, atol=tol)
            theirs_cell = torch.nn.GRUCell(C, H, bias=bias, dtype=dtype)
            ours_cell = lstm_ext.GRUCell.from_torch(theirs_cell)
            with torch.no_grad():
                torch.testing.assert_close(ours_cell(x[0], h0[0]), theirs_cell(x[0], h0[0]),
                                           rtol=tol, atol=tol)
    # The float32 tanh (our own on the SIMD paths) within 2 ulp of float64 tanh. With zero weights,
    # i = sigmoid(100) = 1 and f = sigmoid(-100) * 0 = 0 exactly, so c_n = tanh(b_g) and
    # h_n = tanh(c_n) straight from the kernel.
    grid = torch.cat([torch.linspace(-12, 12, 6001), torch.logspace(-30, 1, 500),
                      -torch.logspace(-30, 1, 500), torch.tensor([0.0, -0.0, 0.625, -0.625])])
    H = grid.numel()
    cell = lstm_ext.LSTM(1, H)
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()
        cell.bias_ih_l0.copy_(torch.cat([torch.full((H,), 100.0), torch.full((H,), -100.0),
                                         grid, torch.full((H,), 100.0)]))
        _, (h_n, c_n) = cell(torch.zeros(1, 1, 1))
    for argument, value in ((grid, c_n.flatten()), (c_n.flatten(), h_n.flatten())):
        expected = torch.tanh(argument.double())
        ulp = (torch.nextafter(expected.float().abs(), torch.tensor(float("inf")))
               - expected.float().abs()).double()
        error = ((value.double() - expected).abs() / ulp).max().item()
        assert error <= 2.0, f"tanh off by {error} ulp"
    print("ok")
    """
)


def _cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_cpu_path_matches_torch(capability):
    flags = _cpu_flags()
    needed = {"AVX2": {"avx2", "fma"}, "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
    if not needed.get(capability, set()) <= flags:
        pytest.skip(f"this CPU lacks {capability}")
    env = {**os.environ, "LSTM_EXT_CPU_CAPABILITY": capability}
    result = subprocess.run(
        [sys.executable, "-c", PARITY_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert lines[0] == capability, f"ran {lines[0]} instead of {capability}"
    assert lines[-1] == "ok"
