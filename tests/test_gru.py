"""lstm_ext.GRU / GRUCell against torch.nn.GRU / GRUCell, and the GRU operators themselves.

Outputs, final states and every gradient (input, h_0, each parameter) with identical weights;
bad input gets torch's exception type and message; module hygiene (state_dict, conversions, repr,
copies, torch.compile, autocast); opcheck and gradcheck of the lstm_ext GRU operators.
"""

from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
from conftest import assert_close
from torch import _VF
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_ext
from lstm_ext import functional, ops, reference

DTYPES = [torch.float64, torch.float32]


def paired_grus(dtype: torch.dtype = torch.float64, **kwargs) -> tuple[torch.nn.GRU, lstm_ext.GRU]:
    """A torch.nn.GRU and an lstm_ext.GRU with the same configuration and the same weights."""
    theirs = torch.nn.GRU(**kwargs, dtype=dtype)
    ours = lstm_ext.GRU(**kwargs, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _data(output):
    return output.data if isinstance(output, PackedSequence) else output


def _compare(theirs, ours, dtype, args, leaves, names):
    """Runs both modules on args: outputs, h_n and the gradients of leaves + parameters."""
    expected, actual = theirs(*args), ours(*args)
    for name, a, e in zip(("output", "h_n"), actual, expected):
        a, e = _data(a), _data(e)
        assert a.shape == e.shape and a.dtype == e.dtype, name
        assert_close(a, e, dtype, name)
    if isinstance(expected[0], PackedSequence):
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, e = getattr(actual[0], field), getattr(expected[0], field)
            assert (a is None and e is None) or torch.equal(a, e), field
    # Distinct weights on output and h_n, so that a gradient routed to the wrong place shows.
    h_weight = torch.randn_like(expected[1])

    def loss(result):
        return _data(result[0]).square().sum() + (result[1] * h_weight).sum()

    # retain_graph: a PackedSequence's packing of the input is shared by both graphs.
    grads_e = torch.autograd.grad(
        loss(expected), [*leaves, *theirs.parameters()], retain_graph=True
    )
    grads_a = torch.autograd.grad(loss(actual), [*leaves, *ours.parameters()])
    names = [*names, *(n for n, _ in ours.named_parameters())]
    assert len(grads_a) == len(names)
    for name, a, e in zip(names, grads_a, grads_e):
        assert_close(a, e, dtype, f"grad of {name}")


def _check_parity(dtype, input_shape, hx_shape, with_state, **config):
    theirs, ours = paired_grus(dtype, **config)
    x = torch.randn(input_shape, dtype=dtype, requires_grad=True)
    if not with_state:
        _compare(theirs, ours, dtype, (x,), [x], ["input"])
        return
    h0 = torch.randn(hx_shape, dtype=dtype, requires_grad=True)
    _compare(theirs, ours, dtype, (x, h0), [x, h0], ["input", "h_0"])


# ----------------------------------------------------------------------------------------------
# Parity with torch.nn.GRU


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,bias,with_state",
    [
        (1, False, False, True, False),
        (1, False, False, True, True),
        (1, True, False, True, True),
        (1, False, False, False, True),
        (2, False, True, True, True),
        (2, True, True, False, True),
        (2, True, False, True, False),
        (2, False, False, False, False),
    ],
)
def test_gru_parity(dtype, num_layers, bidirectional, batch_first, bias, with_state):
    steps, batch, features, hidden = 5, 3, 6, 7
    directions = 2 if bidirectional else 1
    shape = (batch, steps, features) if batch_first else (steps, batch, features)
    _check_parity(
        dtype, shape, (num_layers * directions, batch, hidden), with_state,
        input_size=features, hidden_size=hidden, num_layers=num_layers, bias=bias,
        batch_first=batch_first, bidirectional=bidirectional,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 7, 8, 16, 17, 33])
def test_gru_parity_hidden_sizes_around_simd_widths(dtype, hidden):
    # 4 doubles / 8 floats (AVX2), 8 / 16 (AVX-512) per vector: the vector body and scalar tail.
    _check_parity(
        dtype, (4, 5, 3), (2, 5, hidden), True, input_size=3, hidden_size=hidden,
        bidirectional=True,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps,batch", [(1, 3), (6, 1), (1, 1)])
def test_gru_parity_single_step_and_single_sequence(dtype, steps, batch):
    _check_parity(
        dtype, (steps, batch, 4), (2, batch, 9), True, input_size=4, hidden_size=9, num_layers=2
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_gru_unbatched(dtype, batch_first, with_state):
    _check_parity(
        dtype, (5, 4), (4, 6), with_state, input_size=4, hidden_size=6, num_layers=2,
        bidirectional=True, batch_first=batch_first,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_gru_packed(dtype, enforce_sorted, bidirectional, with_state):
    theirs, ours = paired_grus(
        dtype, input_size=3, hidden_size=5, num_layers=2, bidirectional=bidirectional
    )
    lengths = [6, 4, 4, 1] if enforce_sorted else [2, 6, 1, 4]
    x = torch.randn(6, 4, 3, dtype=dtype, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    if not with_state:
        _compare(theirs, ours, dtype, (packed,), [x], ["input"])
        return
    # h_0 in the caller's batch order: permuted by sorted_indices, h_n back by unsorted_indices.
    h0 = torch.randn(2 * (2 if bidirectional else 1), 4, 5, dtype=dtype, requires_grad=True)
    _compare(theirs, ours, dtype, (packed, h0), [x, h0], ["input", "h_0"])


def test_gru_packed_batch_first_sequences_of_one_step():
    theirs, ours = paired_grus(input_size=2, hidden_size=3, batch_first=True)
    packed = pack_sequence([torch.randn(1, 2, dtype=torch.float64) for _ in range(3)])
    for a, e in zip(ours(packed), theirs(packed)):
        assert_close(_data(a), _data(e), torch.float64, "packed T=1")


def test_gru_zero_batch():
    theirs, ours = paired_grus(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 0, 3, dtype=torch.float64, requires_grad=True)
    expected, actual = theirs(x), ours(x)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
    (grad,) = torch.autograd.grad(actual[0].sum() + actual[1].sum(), x)
    assert grad.shape == x.shape
    cell_theirs = torch.nn.GRUCell(3, 4)
    cell_ours = lstm_ext.GRUCell.from_torch(cell_theirs)
    assert cell_ours(torch.randn(0, 3)).shape == cell_theirs(torch.randn(0, 3)).shape


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))

    def ops(self) -> list[str]:
        return [name for name, _ in self.calls]

    def trainings(self, op: str) -> list[bool]:
        # The training argument: gru_forward(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, training,
        # ...), gru_cell_forward(input, hx, w_ih, w_hh, b_ih, b_hh, training).
        index = 7 if op == "gru_forward" else 6
        return [args[index] for name, args in self.calls if name == f"lstm_ext.{op}.default"]


def test_gru_eval_no_grad_and_inference_mode_run_the_inference_op():
    theirs, ours = paired_grus(input_size=3, hidden_size=5, num_layers=2)
    theirs.eval()
    ours.eval()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    expected = theirs(x)
    for context in (torch.no_grad(), torch.inference_mode()):
        with context, _OpRecorder() as recorder:
            actual = ours(x)
        for a, e in zip(actual, expected):
            assert_close(a, e, torch.float64, "inference")
            assert a.grad_fn is None
        assert recorder.trainings("gru_forward") == [False, False]
    # With gradients: the training op (saving its gates), differentiable.
    with _OpRecorder() as recorder:
        output, _ = ours(x.requires_grad_())
    assert recorder.trainings("gru_forward") == [True, True] and output.grad_fn is not None


def test_gru_dropout_between_layers():
    theirs, ours = paired_grus(input_size=3, hidden_size=5, num_layers=3, dropout=0.5)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    # eval(): dropout off, deterministic and torch's.
    theirs.eval()
    ours.eval()
    eval_output = ours(x)[0]
    assert torch.equal(ours(x)[0], eval_output)
    assert_close(eval_output, theirs(x)[0], torch.float64, "eval output")
    # train(): dropout on. It runs, differs from eval, and as torch's CPU GRU makes the same
    # dropout calls in the same order, the same seed gives torch's output (a new seed does not).
    theirs.train()
    ours.train()
    torch.manual_seed(123)
    expected = theirs(x)[0]
    torch.manual_seed(123)
    actual = ours(x)[0]
    assert not torch.allclose(actual, eval_output)
    assert_close(actual, expected, torch.float64, "train output with dropout")
    torch.manual_seed(124)
    assert not torch.allclose(ours(x)[0], actual)


def test_gru_single_layer_dropout_warns_like_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        lstm_ext.GRU(3, 4, dropout=0.3)


def test_gru_grad_only_for_some_inputs():
    # Only h_n used, weights frozen: the unused output's gradient is absent.
    theirs, ours = paired_grus(input_size=3, hidden_size=4, num_layers=2)
    for p in [*theirs.parameters(), *ours.parameters()]:
        p.requires_grad_(False)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    (g_t,) = torch.autograd.grad(theirs(x)[1][0].sum(), x)
    (g_o,) = torch.autograd.grad(ours(x)[1][0].sum(), x)
    assert_close(g_o, g_t, torch.float64, "grad through h_n only")


# ----------------------------------------------------------------------------------------------
# Parity with torch.nn.GRUCell


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("hidden", [1, 8, 17])
def test_gru_cell_parity(dtype, bias, batched, with_state, hidden):
    theirs = torch.nn.GRUCell(5, hidden, bias=bias, dtype=dtype)
    ours = lstm_ext.GRUCell(5, hidden, bias=bias, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn((4, 5) if batched else (5,), dtype=dtype, requires_grad=True)
    hx = None
    if with_state:
        hx = torch.randn((4, hidden) if batched else (hidden,), dtype=dtype, requires_grad=True)
    expected, actual = theirs(x, hx), ours(x, hx)
    assert actual.shape == expected.shape
    assert_close(actual, expected, dtype, "h")
    leaves = [x, *([hx] if with_state else [])]
    grads_e = torch.autograd.grad(expected.square().sum(), [*leaves, *theirs.parameters()])
    grads_a = torch.autograd.grad(actual.square().sum(), [*leaves, *ours.parameters()])
    names = ["input", *(["hx"] if with_state else []), *(n for n, _ in ours.named_parameters())]
    assert len(grads_a) == len(names)
    for name, a, e in zip(names, grads_a, grads_e):
        assert_close(a, e, dtype, f"grad of {name}")


def test_gru_cell_unrolled_sequence_matches_gru():
    cell = lstm_ext.GRUCell(3, 6).double()
    gru = torch.nn.GRU(3, 6).double()
    with torch.no_grad():
        for suffix in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, f"{suffix}_l0").copy_(getattr(cell, suffix))
    x = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.zeros(2, 6, dtype=torch.float64)
    outs = []
    for x_t in x.unbind(0):
        h = cell(x_t, h)
        outs.append(h)
    ours = torch.stack(outs)
    theirs = gru(x)[0]
    assert_close(ours, theirs, torch.float64, "unrolled output")
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    assert_close(g_ours, g_theirs, torch.float64, "unrolled input gradient")


def test_gru_cell_inference_runs_the_inference_op():
    cell = lstm_ext.GRUCell(3, 4)
    x = torch.randn(2, 3)
    with torch.no_grad(), _OpRecorder() as recorder:
        h = cell(x)
    assert h.grad_fn is None
    assert recorder.trainings("gru_cell_forward") == [False]


# ----------------------------------------------------------------------------------------------
# Bad input: torch's exception type and message


def assert_same_error(ours, theirs) -> None:
    """Runs theirs (torch) first, then expects ours to raise the same type and message."""
    with pytest.raises(Exception) as info:
        theirs()
    expected = info.value
    with pytest.raises(type(expected), match=re.escape(str(expected))) as info:
        ours()
    assert type(info.value) is type(expected)
    assert str(info.value) == str(expected)


def _x(*shape, dtype=torch.float32, device="cpu"):
    if device == "meta":
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.randn(*shape, dtype=dtype, device=device)


CONSTRUCTOR_CASES = {
    "hidden_size zero": dict(input_size=4, hidden_size=0),
    "hidden_size float": dict(input_size=4, hidden_size=3.0),
    "num_layers zero": dict(input_size=4, hidden_size=3, num_layers=0),
    "dropout above one": dict(input_size=4, hidden_size=3, num_layers=2, dropout=1.5),
    "dropout bool": dict(input_size=4, hidden_size=3, dropout=True),
}


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_CASES.values(), ids=CONSTRUCTOR_CASES.keys())
def test_gru_constructor_errors(kwargs):
    assert_same_error(lambda: lstm_ext.GRU(**kwargs), lambda: torch.nn.GRU(**kwargs))


def test_gru_has_no_proj_size():
    # torch.nn.GRU takes **kwargs and raises a ValueError for proj_size; lstm_ext.GRU spells out
    # its arguments, so Python refuses the unknown keyword.
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        torch.nn.GRU(4, 3, proj_size=2)
    with pytest.raises(TypeError, match="proj_size"):
        lstm_ext.GRU(4, 3, proj_size=2)


# (module kwargs, input, hx) — 2 layers, 4 -> 3, batch 2, sequence 5 unless stated.
FORWARD_CASES = {
    "input rank 1": (dict(), lambda: _x(4), None),
    "input rank 4": (dict(), lambda: _x(1, 5, 2, 4), None),
    "input features": (dict(), lambda: _x(5, 2, 6), None),
    "input features batch_first": (dict(batch_first=True), lambda: _x(2, 5, 6), None),
    "input dtype double": (dict(), lambda: _x(5, 2, 4, dtype=torch.float64), None),
    "input dtype long": (dict(), lambda: torch.ones(5, 2, 4, dtype=torch.long), None),
    "empty sequence": (dict(), lambda: _x(0, 2, 4), None),
    "empty sequence batch_first": (dict(batch_first=True), lambda: _x(2, 0, 4), None),
    "h0 batch size": (dict(), lambda: _x(5, 2, 4), lambda: _x(2, 3, 3)),
    "h0 layers": (dict(), lambda: _x(5, 2, 4), lambda: _x(1, 2, 3)),
    "h0 hidden": (dict(), lambda: _x(5, 2, 4), lambda: _x(2, 2, 5)),
    "bidirectional h0 layers": (dict(bidirectional=True), lambda: _x(5, 2, 4), lambda: _x(2, 2, 3)),
    "h0 rank 2 for batched input": (dict(), lambda: _x(5, 2, 4), lambda: _x(2, 3)),
    "hx rank 3 for unbatched input": (dict(), lambda: _x(5, 4), lambda: _x(2, 1, 3)),
    "unbatched h0 shape": (dict(), lambda: _x(5, 4), lambda: _x(2, 4)),
    "h0 dtype double": (dict(), lambda: _x(5, 2, 4), lambda: _x(2, 2, 3, dtype=torch.float64)),
    "h0 dtype double without bias": (
        dict(bias=False), lambda: _x(5, 2, 4), lambda: _x(2, 2, 3, dtype=torch.float64)
    ),
    "h0 dtype half": (dict(), lambda: _x(5, 2, 4), lambda: _x(2, 2, 3, dtype=torch.float16)),
    "hx a tuple": (dict(), lambda: _x(5, 2, 4), lambda: (_x(2, 2, 3),)),
    "input on another device": (dict(), lambda: _x(5, 2, 4, device="meta"), None),
    "h0 on another device": (dict(), lambda: _x(5, 2, 4), lambda: _x(2, 2, 3, device="meta")),
}


@pytest.mark.parametrize("case", FORWARD_CASES.values(), ids=FORWARD_CASES.keys())
def test_gru_forward_errors(case):
    kwargs, make_input, make_hx = case
    theirs = torch.nn.GRU(4, 3, num_layers=2, **kwargs)
    ours = lstm_ext.GRU(4, 3, num_layers=2, **kwargs)
    x = make_input()
    args = (x,) if make_hx is None else (x, make_hx())
    assert_same_error(lambda: ours(*args), lambda: theirs(*args))


PACKED_CASES = {
    "h0 batch size": (True, lambda: _x(2, 2, 3)),
    "h0 batch size, unsorted": (False, lambda: _x(2, 2, 3)),
    "h0 hidden": (True, lambda: _x(2, 3, 5)),
    "h0 rank 2": (True, lambda: _x(3, 3)),
    "input features": (True, None),
    "input dtype double": (True, None),
}


@pytest.mark.parametrize("case", PACKED_CASES.items(), ids=PACKED_CASES.keys())
def test_gru_packed_errors(case):
    name, (enforce_sorted, make_hx) = case
    theirs, ours = torch.nn.GRU(4, 3, num_layers=2), lstm_ext.GRU(4, 3, num_layers=2)
    features = 6 if name == "input features" else 4
    dtype = torch.float64 if name == "input dtype double" else torch.float32
    lengths = [5, 3, 2] if enforce_sorted else [3, 5, 2]
    packed = pack_padded_sequence(
        _x(5, 3, features, dtype=dtype), lengths, enforce_sorted=enforce_sorted
    )
    args = (packed,) if make_hx is None else (packed, make_hx())
    assert_same_error(lambda: ours(*args), lambda: theirs(*args))


CELL_CASES = {
    "input rank 3": (dict(), lambda: _x(2, 2, 4), None),
    "input rank 0": (dict(), lambda: torch.tensor(1.0), None),
    "input features": (dict(), lambda: _x(2, 5), None),
    "h batch size": (dict(), lambda: _x(2, 4), lambda: _x(3, 3)),
    "h hidden size": (dict(), lambda: _x(2, 4), lambda: _x(2, 4)),
    "h rank 1 for batched input": (dict(), lambda: _x(2, 4), lambda: _x(3)),
    "h rank 1 of the batch size for batched input": (dict(), lambda: _x(2, 4), lambda: _x(2)),
    "hx rank 3": (dict(), lambda: _x(2, 4), lambda: _x(1, 2, 3)),
    "hx rank 2 for unbatched input": (dict(), lambda: _x(4), lambda: _x(2, 3)),
    "unbatched wrong hidden": (dict(), lambda: _x(4), lambda: _x(5)),
    "input dtype double": (dict(), lambda: _x(2, 4, dtype=torch.float64), None),
    "input dtype long": (dict(), lambda: torch.ones(2, 4, dtype=torch.long), None),
    "h dtype double": (dict(), lambda: _x(2, 4), lambda: _x(2, 3, dtype=torch.float64)),
    "input dtype double without bias": (
        dict(bias=False), lambda: _x(2, 4, dtype=torch.float64), None
    ),
    "h dtype bfloat16 without bias": (
        dict(bias=False), lambda: _x(2, 4), lambda: _x(2, 3, dtype=torch.bfloat16)
    ),
    "hx a tuple": (dict(), lambda: _x(2, 4), lambda: (_x(2, 3),)),
}


@pytest.mark.parametrize("case", CELL_CASES.values(), ids=CELL_CASES.keys())
def test_gru_cell_errors(case):
    kwargs, make_input, make_hx = case
    theirs, ours = torch.nn.GRUCell(4, 3, **kwargs), lstm_ext.GRUCell(4, 3, **kwargs)
    x = make_input()
    hx = make_hx() if make_hx else None
    assert_same_error(lambda: ours(x, hx), lambda: theirs(x, hx))


def test_gru_cell_device_mismatch_is_a_clear_error():
    # As for LSTMCell: torch's message depends on the device pair and the kernel that notices;
    # ours names both devices.
    cell = lstm_ext.GRUCell(4, 3)
    message = (
        "Expected all tensors to be on the same device, but found at least two devices, "
        "cpu and meta!"
    )
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cell(torch.empty(2, 4, device="meta"))


def _vf_args(**overrides):
    gru = torch.nn.GRU(4, 3, num_layers=2)
    args = dict(input=_x(5, 2, 4), hx=_x(2, 2, 3), weights=gru._flat_weights, has_biases=True,
                num_layers=2, dropout=0.0, train=False, bidirectional=False, batch_first=False)
    args.update(overrides)
    return list(args.values())


FUNCTIONAL_CASES = {
    "input dtype double": dict(input=_x(5, 2, 4, dtype=torch.float64)),
    "h0 dtype double": dict(hx=_x(2, 2, 3, dtype=torch.float64)),
    "empty sequence": dict(input=_x(0, 2, 4)),
    "empty sequence and h0 dtype double": dict(
        input=_x(0, 2, 4), hx=_x(2, 2, 3, dtype=torch.float64)
    ),
    "h0 layers fewer": dict(hx=_x(1, 2, 3)),
    "h0 layers more": dict(hx=_x(3, 2, 3)),
    "h0 on another device": dict(hx=_x(2, 2, 3, device="meta")),
    "input on another device": dict(input=_x(5, 2, 4, device="meta"),
                                    hx=_x(2, 2, 3, device="meta")),
}


@pytest.mark.parametrize("overrides", FUNCTIONAL_CASES.values(), ids=FUNCTIONAL_CASES.keys())
def test_functional_gru_errors_are_aten_s(overrides):
    args = _vf_args(**overrides)
    assert_same_error(lambda: functional.gru(*args), lambda: _VF.gru(*args))


def test_functional_gru_wrong_number_of_weights():
    # ATen's type and message, then what was expected.
    args = _vf_args()
    args[2] = args[2][:6]
    with pytest.raises(RuntimeError) as info:
        _VF.gru(*args)
    message = re.escape(str(info.value)) + r": expected 8 weight tensors .* got 6"
    with pytest.raises(RuntimeError, match=message):
        functional.gru(*args)


_CELL = torch.nn.GRUCell(4, 3)
_CELL_WEIGHTS = (_CELL.weight_ih, _CELL.weight_hh, _CELL.bias_ih, _CELL.bias_hh)
FUNCTIONAL_CELL_CASES = {
    "input features": (lambda: _x(2, 5), lambda: _x(2, 3), _CELL_WEIGHTS),
    "h batch size": (lambda: _x(2, 4), lambda: _x(3, 3), _CELL_WEIGHTS),
    "h hidden size": (lambda: _x(2, 4), lambda: _x(2, 4), _CELL_WEIGHTS),
    "h rank 1": (lambda: _x(2, 4), lambda: _x(2), _CELL_WEIGHTS),
    "input dtype double": (lambda: _x(2, 4, dtype=torch.float64), lambda: _x(2, 3), _CELL_WEIGHTS),
    "h dtype double": (lambda: _x(2, 4), lambda: _x(2, 3, dtype=torch.float64), _CELL_WEIGHTS),
    "h dtype double without bias": (
        lambda: _x(2, 4), lambda: _x(2, 3, dtype=torch.float64), _CELL_WEIGHTS[:2]
    ),
}


@pytest.mark.parametrize(
    "case", FUNCTIONAL_CELL_CASES.values(), ids=FUNCTIONAL_CELL_CASES.keys()
)
def test_functional_gru_cell_errors_are_aten_s(case):
    make_input, make_hx, weights = case
    x, h = make_input(), make_hx()
    assert_same_error(
        lambda: functional.gru_cell(x, h, *weights), lambda: _VF.gru_cell(x, h, *weights)
    )


# ----------------------------------------------------------------------------------------------
# Module hygiene


def test_state_dict_names_shapes_and_init_match_torch_both_ways():
    config = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True)
    torch.manual_seed(7)
    theirs = torch.nn.GRU(**config)
    torch.manual_seed(7)
    ours = lstm_ext.GRU(**config)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert a.shape == b.shape and torch.equal(a, b), name
    assert ours.weight_ih_l0.shape == (18, 4) and ours.weight_hh_l1_reverse.shape == (18, 6)
    # Both directions, no conversion.
    other = torch.nn.GRU(**config)
    other.load_state_dict(ours.state_dict())
    fresh = lstm_ext.GRU(**config)
    fresh.load_state_dict(other.state_dict())
    x = torch.randn(5, 2, 4)
    for a, e in zip(fresh(x), other(x)):
        assert_close(a, e, torch.float32, "after the round trip")
    torch.manual_seed(3)
    cell_theirs = torch.nn.GRUCell(3, 5)
    torch.manual_seed(3)
    cell_ours = lstm_ext.GRUCell(3, 5)
    assert list(cell_ours.state_dict()) == list(cell_theirs.state_dict())
    for a, b in zip(cell_ours.state_dict().values(), cell_theirs.state_dict().values()):
        assert torch.equal(a, b)
    cell_theirs.load_state_dict(cell_ours.state_dict())
    cell_ours.load_state_dict(cell_theirs.state_dict())


def test_from_torch_and_to_torch():
    theirs = torch.nn.GRU(4, 6, num_layers=2, bias=False, batch_first=True, bidirectional=True,
                          dropout=0.25, dtype=torch.float64).eval()
    theirs.weight_hh_l0.requires_grad_(False)
    ours = lstm_ext.GRU.from_torch(theirs)
    back = ours.to_torch()
    assert type(ours) is lstm_ext.GRU and type(back) is torch.nn.GRU
    for module in (ours, back):
        assert repr(module) == repr(theirs) and not module.training
        for (n_a, p_a), (n_b, p_b) in zip(module.named_parameters(), theirs.named_parameters(),
                                          strict=True):
            assert n_a == n_b and torch.equal(p_a, p_b) and p_a.dtype == p_b.dtype
            assert p_a.requires_grad == p_b.requires_grad
            assert p_a.data_ptr() != p_b.data_ptr()  # copies
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    for a, e in zip(ours(x), theirs(x)):
        assert_close(a, e, torch.float64, "from_torch")
    with pytest.raises(TypeError, match="expects a torch.nn.GRU, got LSTM"):
        lstm_ext.GRU.from_torch(torch.nn.LSTM(4, 6))
    cell = torch.nn.GRUCell(3, 5, bias=False)
    ours_cell = lstm_ext.GRUCell.from_torch(cell)
    assert type(ours_cell.to_torch()) is torch.nn.GRUCell
    x = torch.randn(2, 3)
    assert_close(ours_cell(x), cell(x), torch.float32, "GRUCell.from_torch")
    assert torch.equal(ours_cell.to_torch().weight_ih, cell.weight_ih)
    with pytest.raises(TypeError, match="expects a torch.nn.GRUCell, got GRU"):
        lstm_ext.GRUCell.from_torch(torch.nn.GRU(3, 5))


def test_repr_deepcopy_save_and_flatten_parameters(tmp_path):
    ours = lstm_ext.GRU(4, 6, num_layers=2, batch_first=True, bidirectional=True)
    theirs = torch.nn.GRU(4, 6, num_layers=2, batch_first=True, bidirectional=True)
    assert repr(ours) == repr(theirs)
    assert repr(lstm_ext.GRUCell(3, 5, bias=False)) == repr(torch.nn.GRUCell(3, 5, bias=False))
    ours.flatten_parameters()  # accepted, does nothing
    x = torch.randn(2, 3, 4)
    clone = copy.deepcopy(ours)
    torch.testing.assert_close(clone(x)[0], ours(x)[0], rtol=0, atol=0)
    with torch.no_grad():
        clone.weight_ih_l0.add_(1)
    assert not torch.equal(clone.weight_ih_l0, ours.weight_ih_l0)
    torch.save(ours, tmp_path / "module.pt")
    loaded = torch.load(tmp_path / "module.pt", weights_only=False)
    assert type(loaded) is lstm_ext.GRU
    torch.testing.assert_close(loaded(x)[1], ours(x)[1], rtol=0, atol=0)
    torch.save(ours.state_dict(), tmp_path / "state.pt")
    theirs.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    cell = lstm_ext.GRUCell(3, 5)
    cell_copy = copy.deepcopy(cell)
    assert torch.equal(cell_copy(x[0, :, :3]), cell(x[0, :, :3]))


def test_functional_call_substitutes_parameters():
    gru = lstm_ext.GRU(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    zeros = {name: torch.zeros_like(p) for name, p in gru.named_parameters()}
    output, h_n = torch.func.functional_call(gru, zeros, (x,))
    assert torch.equal(output, torch.zeros_like(output)) and torch.equal(h_n, torch.zeros_like(h_n))
    cell = lstm_ext.GRUCell(3, 4)
    zeros = {name: torch.zeros_like(p) for name, p in cell.named_parameters()}
    h0 = torch.randn(2, 4)
    # Zero weights: r = z = 1/2, n = 0, so h' = h / 2.
    assert_close(torch.func.functional_call(cell, zeros, (x[0], h0)), h0 / 2, torch.float32, "h")


def test_modules_run_lstm_ext_operators_not_torch_gru():
    gru = lstm_ext.GRU(3, 4, num_layers=2, bidirectional=True)
    cell = lstm_ext.GRUCell(3, 4)
    x = torch.randn(5, 2, 3, requires_grad=True)
    with _OpRecorder() as recorder:
        output, h_n = gru(x)
        h = cell(x[0])
        (output.sum() + h_n.sum() + h.sum()).backward()
    ops_run = recorder.ops()
    assert ops_run.count("lstm_ext.gru_forward.default") == 4  # 2 layers x 2 directions
    assert ops_run.count("lstm_ext._gru_backward.default") == 4
    assert ops_run.count("lstm_ext.gru_cell_forward.default") == 1
    assert ops_run.count("lstm_ext._gru_cell_backward.default") == 1
    assert not [op for op in ops_run if "gru" in op and not op.startswith("lstm_ext.")], ops_run


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_second_order_matches_torch(packed):
    # The fused first order, differentiated further through the reference: double backward and
    # a gradient penalty of a loss linear in the outputs, against torch.nn.GRU's own.
    torch.manual_seed(0)
    gru = lstm_ext.GRU(3, 4, 2, bidirectional=True).double()
    theirs = gru.to_torch()
    cell = lstm_ext.GRUCell(3, 4).double()
    their_cell = cell.to_torch()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)

    def run(module):
        if packed:
            return module(pack_padded_sequence(x, [5, 3], enforce_sorted=False))[0].data
        return module(x)[0]

    def second(output_of, module):
        results = []
        for loss_of in (lambda out: out.square().sum(), lambda out: out.sum()):
            output = output_of()
            (grad,) = torch.autograd.grad(loss_of(output), x, create_graph=True)
            results += torch.autograd.grad(loss_of(output) + grad.square().sum(),
                                           [x, *module.parameters()])
        return results

    for a, e in zip(second(lambda: run(gru), gru), second(lambda: run(theirs), theirs)):
        assert_close(a, e, torch.float64, "GRU second order")
    for a, e in zip(second(lambda: cell(x[0]), cell),
                    second(lambda: their_cell(x[0]), their_cell)):
        assert_close(a, e, torch.float64, "GRUCell second order")


def test_forward_mode_matches_torch():
    # Forward mode runs the reference's math (the fused kernels have no tangent pass): jvp over
    # the input and the parameters, and a frozen module under forward_ad.
    gru, cell = lstm_ext.GRU(3, 4, 2).double(), lstm_ext.GRUCell(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for module, sample in ((gru, x), (cell, x[0])):
        theirs = module.to_torch()
        params = {name: p.detach() for name, p in module.named_parameters()}
        tangents = {name: torch.randn_like(p) for name, p in params.items()}
        name = type(module).__name__

        def f(s, p, module):
            output = torch.func.functional_call(module, p, (s,))
            return output[0] if isinstance(output, tuple) else output

        direction = torch.randn_like(sample)
        ours = torch.func.jvp(functools.partial(f, module=module), (sample, params),
                              (direction, tangents))
        expected = torch.func.jvp(functools.partial(f, module=theirs), (sample, params),
                                  (direction, tangents))
        for a, e in zip(ours, expected):
            assert_close(a, e, torch.float64, f"{name} jvp")
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(sample, direction)
            with torch.no_grad():  # no input requires grad: forward mode alone
                tangent = torch.autograd.forward_ad.unpack_dual(f(dual, params, module)).tangent
        (_, input_only) = torch.func.jvp(functools.partial(f, p=params, module=theirs),
                                         (sample,), (direction,))
        assert_close(tangent, input_only, torch.float64, f"{name} forward_ad")



def test_torch_func_vmap_jacfwd_hessian_match_reference():
    # vmap (per-sample gradients, batched inference), jacfwd, jacrev and hessian: the ops' vmap
    # rules run them once per sample. (torch.nn.GRU itself fails under vmap of its input, so the
    # reference is the oracle.)
    gru = lstm_ext.GRU(3, 4).double()
    params = {name: p.detach() for name, p in gru.named_parameters()}
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64)

    def ours(p, x):
        return torch.func.functional_call(gru, p, (x,))[0]

    def oracle(p, x):
        h0 = x.new_zeros(x.shape[1], 4)
        return reference.gru_layer(x, h0, p["weight_ih_l0"], p["weight_hh_l0"], p["bias_ih_l0"],
                                   p["bias_hh_l0"])[0]

    for name, transform in (
        ("per-sample grad", lambda run: torch.func.vmap(torch.func.grad(
            lambda p, x: run(p, x).square().sum()), in_dims=(None, 0))(params, xs)),
        ("vmap", lambda run: torch.func.vmap(lambda x: run(params, x))(xs)),
        ("jacfwd", lambda run: torch.func.jacfwd(lambda x: run(params, x))(xs[0])),
        ("jacrev", lambda run: torch.func.jacrev(lambda x: run(params, x))(xs[0])),
        ("hessian", lambda run: torch.func.hessian(
            lambda x: run(params, x).square().sum())(xs[0, :2])),
    ):
        a, e = transform(ours), transform(oracle)
        if isinstance(a, dict):
            for key in a:
                assert_close(a[key], e[key], torch.float64, f"{name} {key}")
        else:
            assert_close(a, e, torch.float64, name)


def test_torch_func_grad_matches_torch():
    gru = lstm_ext.GRU(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    params = {name: p.detach() for name, p in gru.named_parameters()}
    theirs = gru.to_torch()

    def loss(module, params):
        return torch.func.functional_call(module, params, (x,))[0].square().sum()

    ours_grad = torch.func.grad(loss, argnums=1)(gru, params)
    torch_grad = torch.func.grad(loss, argnums=1)(theirs, params)
    for name in params:
        assert_close(ours_grad[name], torch_grad[name], torch.float64, f"torch.func.grad {name}")


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = lstm_ext.GRU(4, 8, num_layers=2, batch_first=True, bidirectional=True)
            self.cell = lstm_ext.GRUCell(4, 8)
            self.head = torch.nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            output, h_n = self.gru(x)
            return self.head(output[:, -1]) + h_n.sum() + self.cell(x[:, 0]).mean()

    model = Model()
    # aot_eager traces forward and backward through the fake kernels as inductor does, without
    # inductor's C++ compile time (test_compile.py runs inductor for the LSTM).
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 6, 4, requires_grad=True)
    eager_out, compiled_out = model(x), compiled(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    inputs = [x, *model.parameters()]
    eager_grads = torch.autograd.grad(eager_out.sum(), inputs)
    compiled_grads = torch.autograd.grad(compiled_out.sum(), inputs)
    for a, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# torch.autocast on the CPU


def _state(layers: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(layers, 3, 6, dtype=dtype)


AUTOCAST_CALLS = {
    "no state": lambda layers, x: (x,),
    "float32 state": lambda layers, x: (x, _state(layers, torch.float32)),
    "bfloat16 state": lambda layers, x: (x, _state(layers, torch.bfloat16)),
    "bfloat16 input": lambda layers, x: (x.bfloat16(),),
    "packed": lambda layers, x: (pack_padded_sequence(x, [5, 3, 2]),),
    "packed with bfloat16 state": lambda layers, x: (
        pack_padded_sequence(x, [5, 3, 2]), _state(layers, torch.bfloat16)
    ),
    "unbatched": lambda layers, x: (x[:, 0],),
}


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("call", AUTOCAST_CALLS.values(), ids=AUTOCAST_CALLS.keys())
def test_cpu_autocast_dtypes_and_values_match_torch(autocast_dtype, call):
    # torch's CPU GRU autocasts only its GEMMs; its outputs come out in
    # promote_types(autocast dtype, h_0's dtype).
    theirs = torch.nn.GRU(4, 6, num_layers=2, bidirectional=True)
    ours = lstm_ext.GRU.from_torch(theirs)
    args = call(4, torch.randn(5, 3, 4))
    with torch.autocast("cpu", dtype=autocast_dtype):
        expected, actual = theirs(*args), ours(*args)
    for a, e in zip(actual, expected):
        a, e = _data(a), _data(e)
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), rtol=0.05, atol=0.05)
    grads = torch.autograd.grad(_data(actual[0]).float().sum(), list(ours.parameters()))
    assert all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_autocast_gru_cell_matches_torch(autocast_dtype):
    theirs = torch.nn.GRUCell(4, 6)
    ours = lstm_ext.GRUCell.from_torch(theirs)
    x = torch.randn(3, 4)
    for hx in (None, torch.randn(3, 6), torch.randn(3, 6, dtype=torch.bfloat16)):
        with torch.autocast("cpu", dtype=autocast_dtype):
            expected, actual = theirs(x, hx), ours(x, hx)
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0.05, atol=0.05)


def test_cpu_autocast_leaves_float64_alone_like_torch():
    theirs = torch.nn.GRU(4, 6).double()
    ours = lstm_ext.GRU.from_torch(theirs)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = theirs(x), ours(x)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype == torch.float64
        assert_close(a, e, torch.float64, "float64 under autocast")


# ONNX export: tests/test_onnx.py.


# ----------------------------------------------------------------------------------------------
# The operators: opcheck, gradcheck


def _gru_layer_args(steps=4, batch=3, features=5, hidden=6, bias=True, packed=False,
                    requires_grad=False, dtype=torch.float64):
    def make(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(requires_grad)

    batch_sizes = torch.tensor([3, 3, 2, 1]) if packed else None
    x = make(int(batch_sizes.sum()), features) if packed else make(steps, batch, features)
    args = (
        x, make(batch, hidden), make(3 * hidden, features, scale=0.5),
        make(3 * hidden, hidden, scale=0.5),
        make(3 * hidden) if bias else None, make(3 * hidden) if bias else None,
    )
    return args, batch_sizes


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_gru_forward_and_backward(training, reverse, packed):
    args, batch_sizes = _gru_layer_args(packed=packed, requires_grad=training)
    torch.library.opcheck(
        torch.ops.lstm_ext.gru_forward.default, (*args, reverse, training, batch_sizes)
    )
    if training:
        detached = [a.detach() for a in args]
        out, h_n, gates, hidden_n = ops.gru_forward(*detached, reverse, True, batch_sizes)
        grads = (torch.randn_like(out), torch.randn_like(h_n))
        torch.library.opcheck(
            torch.ops.lstm_ext._gru_backward.default,
            (*grads, *detached[:4], out, gates, hidden_n, reverse, batch_sizes),
        )


def test_opcheck_gru_forward_inference_call_with_grad_inputs():
    # training=False yet differentiated: the op's own autograd recomputes with training=True.
    args, _ = _gru_layer_args(requires_grad=True)
    torch.library.opcheck(torch.ops.lstm_ext.gru_forward.default, (*args, True, False))


def test_opcheck_gru_forward_without_bias():
    args, _ = _gru_layer_args(bias=False, requires_grad=True)
    torch.library.opcheck(torch.ops.lstm_ext.gru_forward.default, (*args, False, True))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_gru_cell_forward_and_backward(training, bias):
    (x, hx, *weights), _ = _gru_layer_args(bias=bias, requires_grad=training)
    x = x[0].detach().requires_grad_(training)
    torch.library.opcheck(torch.ops.lstm_ext.gru_cell_forward.default, (x, hx, *weights, training))
    if training:
        x, hx, w_ih, w_hh = (t.detach() for t in (x, hx, *weights[:2]))
        h, gates, hidden_n = ops.gru_cell_forward(x, hx, w_ih, w_hh, *weights[2:], True)
        torch.library.opcheck(
            torch.ops.lstm_ext._gru_cell_backward.default,
            (torch.randn_like(h), x, hx, w_ih, w_hh, gates, hidden_n),
        )


def test_every_gru_op_has_a_cpu_kernel_and_a_fake():
    for name in ("gru_forward", "_gru_backward", "gru_cell_forward", "_gru_cell_backward"):
        qualified = f"lstm_ext::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"), name
        entry = torch._library.simple_registry.singleton.find(qualified)
        assert entry.fake_impl.kernel is not None, name


def test_gradcheck_gru_module():
    gru = lstm_ext.GRU(2, 3, num_layers=2, bidirectional=True).double()
    names = [name for name, _ in gru.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, h0, *params):
        return torch.func.functional_call(gru, dict(zip(names, params)), (x, h0))

    assert torch.autograd.gradcheck(f, (x, h0, *gru.parameters()))


def test_gradcheck_gru_packed():
    gru = lstm_ext.GRU(2, 3, bidirectional=True).double()
    names = [name for name, _ in gru.named_parameters()]
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, h0, *params):
        packed = pack_padded_sequence(x, [2, 3, 1], enforce_sorted=False)
        output, h_n = torch.func.functional_call(gru, dict(zip(names, params)), (packed, h0))
        return output.data, h_n

    assert torch.autograd.gradcheck(f, (x, h0, *gru.parameters()))


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_gru_cell(bias):
    cell = lstm_ext.GRUCell(2, 3, bias=bias).double()
    names = [name for name, _ in cell.named_parameters()]
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, hx, *params):
        return torch.func.functional_call(cell, dict(zip(names, params)), (x, hx))

    assert torch.autograd.gradcheck(f, (x, hx, *cell.parameters()))
