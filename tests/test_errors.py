"""Bad input gets torch.nn.LSTM's / torch.nn.LSTMCell's answer: the same exception type and message.

Each case runs the same mistake through torch's module and ours and compares what they raise.
"""

from __future__ import annotations

import re

import pytest
import torch

import lstm_ext


def _raised(fn) -> BaseException:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def assert_same_error(ours, theirs) -> None:
    expected, actual = _raised(theirs), _raised(ours)
    assert type(actual) is type(expected), (type(actual), type(expected), str(expected))
    assert str(actual) == str(expected)


CONSTRUCTOR_CASES = {
    "hidden_size zero": dict(input_size=4, hidden_size=0),
    "hidden_size negative": dict(input_size=4, hidden_size=-1),
    "hidden_size float": dict(input_size=4, hidden_size=3.0),
    "input_size zero": dict(input_size=0, hidden_size=3),
    "num_layers zero": dict(input_size=4, hidden_size=3, num_layers=0),
    "dropout above one": dict(input_size=4, hidden_size=3, num_layers=2, dropout=1.5),
    "dropout bool": dict(input_size=4, hidden_size=3, dropout=True),
    "proj_size negative": dict(input_size=4, hidden_size=3, proj_size=-1),
    "proj_size not smaller": dict(input_size=4, hidden_size=3, proj_size=3),
}


@pytest.mark.parametrize("kwargs", CONSTRUCTOR_CASES.values(), ids=CONSTRUCTOR_CASES.keys())
def test_constructor_errors(kwargs):
    assert_same_error(lambda: lstm_ext.LSTM(**kwargs), lambda: torch.nn.LSTM(**kwargs))


def _x(*shape, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(*shape, dtype=dtype, device=device)
        if device != "meta"
        else torch.empty(*shape, dtype=dtype, device=device)
    )


# (name, module kwargs, input, hx) — 2 layers, 4 -> 3, batch 2, sequence 5 unless stated.
FORWARD_CASES = {
    "input rank 1": (dict(), lambda: _x(4), None),
    "input rank 4": (dict(), lambda: _x(1, 5, 2, 4), None),
    "input features": (dict(), lambda: _x(5, 2, 6), None),
    "input features batch_first": (dict(batch_first=True), lambda: _x(2, 5, 6), None),
    "input dtype double": (dict(), lambda: _x(5, 2, 4, dtype=torch.float64), None),
    "input dtype long": (dict(), lambda: torch.ones(5, 2, 4, dtype=torch.long), None),
    "empty sequence": (dict(), lambda: _x(0, 2, 4), None),
    "empty sequence batch_first": (dict(batch_first=True), lambda: _x(2, 0, 4), None),
    "h0 batch size": (dict(), lambda: _x(5, 2, 4), lambda: (_x(2, 3, 3), _x(2, 2, 3))),
    "h0 layers": (dict(), lambda: _x(5, 2, 4), lambda: (_x(1, 2, 3), _x(2, 2, 3))),
    "c0 shape": (dict(), lambda: _x(5, 2, 4), lambda: (_x(2, 2, 3), _x(1, 2, 3))),
    "c0 hidden": (dict(), lambda: _x(5, 2, 4), lambda: (_x(2, 2, 3), _x(2, 2, 5))),
    "h0 rank for batched input": (dict(), lambda: _x(5, 2, 4), lambda: (_x(2, 3), _x(2, 2, 3))),
    "hx rank for unbatched input": (dict(), lambda: _x(5, 4), lambda: (_x(2, 1, 3), _x(2, 3))),
    "unbatched h0 shape": (dict(), lambda: _x(5, 4), lambda: (_x(2, 4), _x(2, 3))),
    "hx not a pair of 3-D": (dict(), lambda: _x(5, 2, 4), lambda: _x(2, 2, 3)),
    "bidirectional h0 layers": (
        dict(bidirectional=True),
        lambda: _x(5, 2, 4),
        lambda: (_x(2, 2, 3), _x(4, 2, 3)),
    ),
    "input on another device": (dict(), lambda: _x(5, 2, 4, device="meta"), None),
    "h0 on another device": (
        dict(),
        lambda: _x(5, 2, 4),
        lambda: (_x(2, 2, 3, device="meta"), _x(2, 2, 3)),
    ),
    "c0 on another device": (
        dict(),
        lambda: _x(5, 2, 4),
        lambda: (_x(2, 2, 3), _x(2, 2, 3, device="meta")),
    ),
}


@pytest.mark.parametrize("case", FORWARD_CASES.values(), ids=FORWARD_CASES.keys())
def test_forward_errors(case):
    kwargs, make_input, make_hx = case
    theirs = torch.nn.LSTM(4, 3, num_layers=2, **kwargs)
    ours = lstm_ext.LSTM(4, 3, num_layers=2, **kwargs)
    x = make_input()
    hx = make_hx() if make_hx else None
    args = (x,) if hx is None else (x, hx)
    assert_same_error(lambda: ours(*args), lambda: theirs(*args))


@pytest.mark.parametrize("which", [0, 1], ids=["h0", "c0"])
def test_state_dtype_mismatch_matches_torch_native_path(which):
    # torch's oneDNN path answers this with an internal "get_mkldnn_dtype: unsupported data type";
    # we give the message of torch's native path (oneDNN off), which names the dtypes.
    theirs = torch.nn.LSTM(4, 3, num_layers=2)
    ours = lstm_ext.LSTM(4, 3, num_layers=2)
    x = _x(5, 2, 4)
    hx = [_x(2, 2, 3), _x(2, 2, 3)]
    hx[which] = hx[which].double()
    with torch.backends.mkldnn.flags(enabled=False):
        assert_same_error(lambda: ours(x, tuple(hx)), lambda: theirs(x, tuple(hx)))


def test_hx_with_three_states():
    theirs, ours = torch.nn.LSTM(4, 3), lstm_ext.LSTM(4, 3)
    x = _x(5, 2, 4)
    hx = (_x(1, 2, 3), _x(1, 2, 3), _x(1, 2, 3))
    assert_same_error(lambda: ours(x, hx), lambda: theirs(x, hx))


CELL_CASES = {
    "input rank 3": (lambda: _x(2, 2, 4), None),
    "input rank 0": (lambda: torch.tensor(1.0), None),
    "input features": (lambda: _x(2, 5), None),
    "h batch size": (lambda: _x(2, 4), lambda: (_x(3, 3), _x(2, 3))),
    "c hidden size": (lambda: _x(2, 4), lambda: (_x(2, 3), _x(2, 4))),
    "h rank 1 for batched input": (lambda: _x(2, 4), lambda: (_x(3), _x(2, 3))),
    "hx rank 3": (lambda: _x(2, 4), lambda: (_x(1, 2, 3), _x(2, 3))),
    "hx rank 2 for unbatched input": (lambda: _x(4), lambda: (_x(2, 3), _x(2, 3))),
    "unbatched wrong hidden": (lambda: _x(4), lambda: (_x(5), _x(3))),
    "input dtype double": (lambda: _x(2, 4, dtype=torch.float64), None),
    "input dtype long": (lambda: torch.ones(2, 4, dtype=torch.long), None),
    "h dtype double": (lambda: _x(2, 4), lambda: (_x(2, 3, dtype=torch.float64), _x(2, 3))),
}


@pytest.mark.parametrize("case", CELL_CASES.values(), ids=CELL_CASES.keys())
def test_cell_errors(case):
    make_input, make_hx = case
    theirs, ours = torch.nn.LSTMCell(4, 3), lstm_ext.LSTMCell(4, 3)
    x = make_input()
    hx = make_hx() if make_hx else None
    assert_same_error(lambda: ours(x, hx), lambda: theirs(x, hx))


def test_cell_device_mismatch_is_a_clear_error():
    # torch's message for this depends on the device pair and the kernel that notices; ours names
    # both devices.
    cell = lstm_ext.LSTMCell(4, 3)
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "Expected all tensors to be on the same device, but found at least two devices, "
            "cpu and meta!"
        ),
    ):
        cell(torch.empty(2, 4, device="meta"))
