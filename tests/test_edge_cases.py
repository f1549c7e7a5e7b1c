"""Determinism, and the edge cases: T = 1, N = 1, N = 0, very long sequences, NaN and inf."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close, paired_lstms
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

DTYPES = [torch.float64, torch.float32]


def _run_and_grad(module, x, hx=None, packed_lengths=None):
    """Outputs, final states and every gradient (input, states, parameters) of one training step."""
    inputs = x if packed_lengths is None else pack_padded_sequence(
        x, packed_lengths, enforce_sorted=False)
    output, (h_n, c_n) = module(inputs, hx) if hx is not None else module(inputs)
    output = output if packed_lengths is None else output.data
    leaves = [x, *(hx or ()), *module.parameters()]
    loss = output.square().sum() + 2 * h_n.sum() + c_n.square().sum()
    return [output, h_n, c_n, *torch.autograd.grad(loss, leaves)]


# ---------------------------------------------------------------------------------------------
# Determinism: bitwise-identical results run to run on the CPU.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed", [False, True])
def test_bitwise_deterministic_run_to_run(dtype, packed):
    # Big enough that the CPU kernels split work across threads (rows and GEMM panels).
    lstm = lstm_ext.LSTM(16, 48, num_layers=2, bidirectional=True, proj_size=24, dtype=dtype)
    x = torch.randn(12, 32, 16, dtype=dtype, requires_grad=True)
    lengths = [12 - i % 12 for i in range(32)] if packed else None
    first = _run_and_grad(lstm, x, packed_lengths=lengths)
    for _ in range(2):
        again = _run_and_grad(lstm, x, packed_lengths=lengths)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def _assert_same_bits_on_1_2_3_threads(run) -> None:
    """run() -> tensors, on 1, 2 and 3 threads: every tensor bitwise the same each time."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.skipif(
    lstm_ext.build_info()["cpu_capability"] == "DEFAULT",
    reason="the DEFAULT kernel set multiplies with ATen GEMMs, whose sums follow the threads",
)
@pytest.mark.parametrize("features", [2, 48], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("batch", [1, 7, 32], ids=lambda n: f"N{n}")
def test_float32_results_do_not_depend_on_thread_count(batch, features):
    # The CPU kernels fix the order of every sum (a GEMM's K loop, the bias gradient, the chunks
    # of the narrow products that a 2-feature input's gradients take), whether threads split the
    # batch, the hidden units or the GEMM rows, so float32 results are bitwise the same on 1, 2
    # or 3 threads. (Projections excepted: W_hr goes through ATen.)
    torch.manual_seed(0)
    lstm = lstm_ext.LSTM(features, 128, num_layers=2, bidirectional=True)
    x = torch.randn(9, batch, features, requires_grad=True)
    _assert_same_bits_on_1_2_3_threads(lambda: _run_and_grad(lstm, x))


@pytest.mark.skipif(
    lstm_ext.build_info()["cpu_capability"] == "DEFAULT",
    reason="the DEFAULT kernel set multiplies with ATen GEMMs, whose sums follow the threads",
)
@pytest.mark.parametrize("make", [
    lambda: lstm_ext.LSTM(48, 520, num_layers=2),
    lambda: lstm_ext.LSTM(48, 520, peephole=True, coupled_gates=True),
    lambda: lstm_ext.LSTM(48, 520, zoneout=0.2),
    lambda: lstm_ext.GRU(48, 520, num_layers=2),
], ids=["lstm", "peephole-coupled", "zoneout", "gru"])
@pytest.mark.parametrize("batch", [1, 7, 20], ids=lambda n: f"N{n}")
def test_single_step_float32_forward_does_not_depend_on_thread_count(make, batch):
    # T = 1 (SingleStepFloatBackend): threads split the hidden units (H = 520: 33 panels, enough
    # work to use every thread), each unit's dot products summed in one fixed order; training
    # (which saves the activations) and inference. Not the gradients: a single step's backward
    # runs on ATen's GEMMs (packing for the fused ones cost 1.2-2.3x in T = 1 training), and
    # those gave different last bits on 1 and 2 threads.
    torch.manual_seed(0)
    module = make()
    x = torch.randn(1, batch, 48, requires_grad=True)

    def run():
        torch.manual_seed(1)  # zoneout's masks
        output, states = module(x)  # states: (h_n, c_n), or the GRU's h_n
        with torch.no_grad():
            inference, inference_states = module(x)
        return [output, inference, *torch.utils._pytree.tree_leaves((states, inference_states))]

    _assert_same_bits_on_1_2_3_threads(run)


@pytest.mark.skipif(
    lstm_ext.build_info()["cpu_capability"] == "DEFAULT",
    reason="the DEFAULT kernel set multiplies with ATen GEMMs, whose sums follow the threads",
)
@pytest.mark.parametrize("make", [
    lambda: lstm_ext.GRU(48, 80, num_layers=2, bidirectional=True),
    lambda: lstm_ext.LSTM(48, 80, peephole=True, coupled_gates=True),
    lambda: lstm_ext.LSTM(48, 80, zoneout=0.2),
    lambda: lstm_ext.LSTM(48, 80, 2, bidirectional=True, layer_norm=True, peephole=True),
], ids=["gru", "peephole-coupled", "zoneout", "layer_norm"])
@pytest.mark.parametrize("batch", [5, 40], ids=lambda n: f"N{n}")
def test_other_cells_float32_results_do_not_depend_on_thread_count(make, batch):
    # As the LSTM's: the GRU's and the variants' fused paths (and the ATen sums after their loops,
    # the peephole and b_hn gradients) give bitwise the same results on 1, 2 or 3 threads.
    torch.manual_seed(0)
    module = make()
    x = torch.randn(12, batch, 48, requires_grad=True)

    def run():
        torch.manual_seed(1)  # zoneout's masks
        output = module(x)[0]
        return [output, *torch.autograd.grad(output.square().sum(), [x, *module.parameters()])]

    _assert_same_bits_on_1_2_3_threads(run)


def test_dropout_masks_reproducible_under_manual_seed():
    lstm = lstm_ext.LSTM(5, 8, num_layers=3, dropout=0.5)
    x = torch.randn(6, 4, 5, requires_grad=True)
    torch.manual_seed(11)
    first = _run_and_grad(lstm, x)
    torch.manual_seed(11)
    again = _run_and_grad(lstm, x)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    torch.manual_seed(12)
    assert not torch.equal(_run_and_grad(lstm, x)[0], first[0])


# ---------------------------------------------------------------------------------------------
# Small and empty shapes, with projections and packed batches.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("steps,batch,lengths", [
    (1, 3, None), (7, 1, None), (1, 1, None),    # padded: T = 1, N = 1, both
    (1, 3, [1, 1, 1]), (7, 1, [7]), (4, 3, [1, 4, 1]),  # packed: T = 1, N = 1, mixed
])
def test_single_step_and_single_sequence(dtype, proj_size, steps, batch, lengths):
    theirs, ours = paired_lstms(dtype, input_size=3, hidden_size=5, num_layers=2,
                                bidirectional=True, proj_size=proj_size)
    x = torch.randn(steps, batch, 3, dtype=dtype, requires_grad=True)
    hx = (torch.randn(4, batch, proj_size or 5, dtype=dtype, requires_grad=True),
          torch.randn(4, batch, 5, dtype=dtype, requires_grad=True))
    expected = _run_and_grad(theirs, x, hx, lengths)
    actual = _run_and_grad(ours, x, hx, lengths)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape
        assert_close(a, e, dtype, f"result {i}")


@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_like_torch(proj_size, batch_first):
    # torch.nn.LSTM accepts N = 0 (not T = 0, nor an empty packed batch, which
    # pack_padded_sequence refuses): empty outputs and states, zero-size gradients.
    theirs, ours = paired_lstms(torch.float64, input_size=3, hidden_size=4, num_layers=2,
                                bidirectional=True, proj_size=proj_size, batch_first=batch_first)
    x = torch.randn((0, 5, 3) if batch_first else (5, 0, 3), dtype=torch.float64,
                    requires_grad=True)
    expected, actual = _run_and_grad(theirs, x), _run_and_grad(ours, x)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert_close(a, e, torch.float64, "N = 0")
    cell = lstm_ext.LSTMCell(3, 4)
    h, c = cell(torch.randn(0, 3))
    assert h.shape == (0, 4) and c.shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Very long sequences: no recursion, no per-step growth; memory linear in T.


@pytest.mark.parametrize("packed", [False, True])
def test_hundred_thousand_steps(packed):
    # torch.nn.LSTM needs 13-17 s for this length here, so the check is internal: the whole
    # sequence equals its two halves run one after the other (the state carried across), in
    # both directions. Parity with torch.nn.LSTM is tested on shorter sequences.
    steps, half = 100_000, 50_000
    lstm = lstm_ext.LSTM(3, 4).double()
    x = torch.randn(steps, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = [steps, steps - 1] if packed else None
    result = _run_and_grad(lstm, x, packed_lengths=lengths)
    assert all(torch.isfinite(t).all() for t in result)
    if packed:
        return
    output, h_n, c_n = result[:3]
    with torch.no_grad():
        first, state = lstm(x[:half])
        second, (h_2, c_2) = lstm(x[half:], state)
    assert_close(torch.cat([first, second]), output, torch.float64, "output in two halves")
    assert_close(h_2, h_n, torch.float64, "h_n in two halves")
    assert_close(c_2, c_n, torch.float64, "c_n in two halves")
    # The reverse direction over the same length, through the op directly.
    w = [p.detach() for p in lstm.parameters()]
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    with torch.no_grad():
        rev, h_rev, _, *_ = lstm_ext.ops.lstm_forward(x, zeros, zeros, *w, reverse=True)
        rev_half, h_half, c_half, *_ = lstm_ext.ops.lstm_forward(x[half:], zeros, zeros, *w,
                                                                 reverse=True)
        rev_first, h_first, *_ = lstm_ext.ops.lstm_forward(x[:half], h_half, c_half, *w,
                                                           reverse=True)
    assert_close(torch.cat([rev_first, rev_half]), rev, torch.float64, "reverse in two halves")
    assert_close(h_first, h_rev, torch.float64, "reverse h_n in two halves")


# ---------------------------------------------------------------------------------------------
# NaN and inf propagate as in torch.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("packed", [False, True])
def test_nan_and_inf_propagate_like_torch(dtype, bad, packed):
    theirs, ours = paired_lstms(dtype, input_size=3, hidden_size=5, num_layers=2,
                                bidirectional=True)
    x = torch.randn(6, 3, 3, dtype=dtype)
    x[2, 1, 0] = bad
    x.requires_grad_()
    lengths = [6, 4, 3] if packed else None
    expected = _run_and_grad(theirs, x, packed_lengths=lengths)
    actual = _run_and_grad(ours, x, packed_lengths=lengths)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a.isnan(), e.isnan()), f"NaN pattern of result {i}"
        assert torch.equal(a.isinf(), e.isinf()), f"inf pattern of result {i}"
        finite = e.isfinite()
        assert_close(a[finite], e[finite], dtype, f"finite values of result {i}")
    if bad != bad:
        assert actual[0].isnan().any()  # a NaN input reaches the output


HAND_OVER_SCRIPT = """
import sys, time, torch, lstm_ext
torch.manual_seed(0)
results = []
# Batches that make the threads split panels (a barrier per step): N < 6 * threads on AVX-512,
# with and without the fused input projection (N >= 16 on 3 threads), LSTM, GRU and a variant,
# forward (training and inference) and backward.
for make, batch, threads in [
    (lambda: lstm_ext.LSTM(48, 130, 2, bidirectional=True), 7, 2),
    (lambda: lstm_ext.LSTM(48, 130), 16, 3),
    (lambda: lstm_ext.GRU(48, 130, 2), 5, 2),
    (lambda: lstm_ext.GRU(48, 130), 17, 3),
    (lambda: lstm_ext.LSTM(48, 130, peephole=True, zoneout=0.2), 3, 2),
]:
    torch.set_num_threads(threads)
    module = make()
    x = torch.randn(9, batch, 48, requires_grad=True)
    # Past the 100 ms after the previous case's hand-over: this case's first recurrence hands
    # over again, and what runs soon after it runs on one thread.
    time.sleep(0.15)
    torch.manual_seed(1)  # zoneout's masks
    output = module(x)[0]
    grads = torch.autograd.grad(output.square().sum(), [x, *module.parameters()])
    with torch.no_grad():
        inference = module(x)[0]
    results.append([output.detach(), inference, *grads])
torch.save(results, sys.argv[1])
"""


@pytest.mark.skipif(
    lstm_ext.build_info()["cpu_capability"] == "DEFAULT",
    reason="the DEFAULT kernel set has no persistent threads to hand over",
)
def test_recurrence_handed_to_one_thread_gives_the_same_bits(tmp_path):
    # Under load a recurrence whose threads stall at their barriers hands its remaining steps to
    # one thread, and for a while after it the kernels run on one thread (StepSync,
    # cores_recently_busy). LSTM_EXT_HAND_OVER_AT_STEP forces that mid-sequence: the results
    # must be bitwise those of the undisturbed team, and nothing may hang.
    paths = {}
    for label, step in (("team", None), ("handed", "3"), ("first", "0")):
        env = {k: v for k, v in os.environ.items() if k != "LSTM_EXT_HAND_OVER_AT_STEP"}
        if step is not None:
            env["LSTM_EXT_HAND_OVER_AT_STEP"] = step
        paths[label] = tmp_path / f"{label}.pt"
        subprocess.run([sys.executable, "-c", HAND_OVER_SCRIPT, str(paths[label])], env=env,
                       check=True, timeout=240)
    expected = torch.load(paths["team"])
    for label in ("handed", "first"):
        for case_expected, case_actual in zip(expected, torch.load(paths[label])):
            for a, b in zip(case_expected, case_actual):
                assert torch.equal(a, b), label
