"""Property-based parity with torch.nn.LSTM / LSTMCell: random shapes, layers, directions,
batch_first, projections, packed lengths (sorted or not), initial states and dtypes.

The example count is bounded to keep the suite fast, and derandomize=True draws the same
examples on every run, so CI is reproducible; change the seed locally to explore more.
"""

from __future__ import annotations

import torch
from conftest import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_ext

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    # The autouse seeding fixture runs once per test, not per example: harmless here.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@st.composite
def lstm_cases(draw):
    hidden = draw(st.integers(1, 12))
    steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 5))
    packed = draw(st.booleans())
    return dict(
        config=dict(
            input_size=draw(st.integers(1, 6)),
            hidden_size=hidden,
            num_layers=draw(st.integers(1, 3)),
            bias=draw(st.booleans()),
            batch_first=draw(st.booleans()),
            bidirectional=draw(st.booleans()),
            proj_size=draw(st.sampled_from([0, 0] + list(range(1, hidden)))),
        ),
        steps=steps,
        batch=batch,
        lengths=draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
        if packed else None,
        enforce_sorted=draw(st.booleans()),
        with_state=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        seed=draw(st.integers(0, 2**16)),
    )


@SETTINGS
@given(case=lstm_cases())
def test_lstm_matches_torch(case):
    config, dtype, lengths = case["config"], case["dtype"], case["lengths"]
    torch.manual_seed(case["seed"])
    theirs = torch.nn.LSTM(**config, dtype=dtype)
    ours = lstm_ext.LSTM.from_torch(theirs)
    steps, batch = case["steps"], case["batch"]
    shape = (batch, steps, config["input_size"]) if config["batch_first"] else (
        steps, batch, config["input_size"])
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    if lengths is not None:
        lengths = sorted(lengths, reverse=True) if case["enforce_sorted"] else lengths
    hx = None
    if case["with_state"]:
        layers = config["num_layers"] * (2 if config["bidirectional"] else 1)
        hx = (torch.randn(layers, batch, config["proj_size"] or config["hidden_size"],
                          dtype=dtype, requires_grad=True),
              torch.randn(layers, batch, config["hidden_size"], dtype=dtype,
                          requires_grad=True))
    results = []
    for module in (theirs, ours):
        inputs = x if lengths is None else pack_padded_sequence(
            x, lengths, batch_first=config["batch_first"], enforce_sorted=case["enforce_sorted"])
        output, (h_n, c_n) = module(inputs, hx)
        if isinstance(output, PackedSequence):
            output = output.data
        loss = output.square().sum() + 2 * h_n.sum() + c_n.square().sum()
        leaves = [x, *(hx or ()), *module.parameters()]
        results.append((output, h_n, c_n, *torch.autograd.grad(loss, leaves, retain_graph=True)))
    for i, (e, a) in enumerate(zip(*results, strict=True)):
        assert a.shape == e.shape, i
        assert_close(a, e, dtype, f"result {i} of {case}")


@SETTINGS
@given(
    input_size=st.integers(1, 6),
    hidden_size=st.integers(1, 20),
    batch=st.integers(0, 5),
    bias=st.booleans(),
    batched=st.booleans(),
    with_state=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_lstm_cell_matches_torch(input_size, hidden_size, batch, bias, batched, with_state,
                                 dtype, seed):
    torch.manual_seed(seed)
    theirs = torch.nn.LSTMCell(input_size, hidden_size, bias=bias, dtype=dtype)
    ours = lstm_ext.LSTMCell.from_torch(theirs)
    lead = (batch,) if batched else ()
    x = torch.randn(*lead, input_size, dtype=dtype, requires_grad=True)
    hx = None
    if with_state:
        hx = (torch.randn(*lead, hidden_size, dtype=dtype, requires_grad=True),
              torch.randn(*lead, hidden_size, dtype=dtype, requires_grad=True))
    results = []
    for module in (theirs, ours):
        h, c = module(x, hx)
        leaves = [x, *(hx or ()), *module.parameters()]
        results.append((h, c, *torch.autograd.grad(h.square().sum() + 3 * c.sum(), leaves)))
    for i, (e, a) in enumerate(zip(*results, strict=True)):
        assert a.shape == e.shape, i
        assert_close(a, e, dtype, f"cell result {i}")
