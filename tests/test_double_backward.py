"""Gradients of gradients through lstm_ext.LSTM / LSTMCell, against torch.nn.LSTM's native path.

The first-order backward runs the fused ops; its own backward differentiates the reference math
(lstm_ext/ops.py), so these tests check the second (and third) order against torch itself, and
gradgradcheck checks it against finite differences.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, paired_lstms
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

SECOND_ORDER_TOLERANCES = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
}


def _gradient_penalty_grads(module, inputs: list[torch.Tensor], run) -> list[torch.Tensor]:
    """d/d(inputs, parameters) of the squared norm of the loss's gradient (as WGAN-GP computes)."""
    wrt = [*inputs, *module.parameters()]
    loss = run(module)
    first = torch.autograd.grad(loss, wrt, create_graph=True)
    penalty = sum((g * g).sum() for g in first) + loss
    return list(torch.autograd.grad(penalty, wrt))


def _config_id(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items()) or "default"


CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, proj_size=2),
    dict(num_layers=1, bidirectional=True, proj_size=3, bias=False),
    dict(num_layers=2, batch_first=True, dropout=0.3),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("with_state", [False, True])
def test_second_order_matches_torch(dtype, config, mode, with_state):
    theirs, ours = paired_lstms(dtype, input_size=3, hidden_size=4, **config)
    theirs.train(mode == "train")
    ours.train(mode == "train")
    batch_first = config.get("batch_first", False)
    x = torch.randn(*((2, 5) if batch_first else (5, 2)), 3, dtype=dtype, requires_grad=True)
    inputs = [x]
    state = None
    if with_state:
        layers = config["num_layers"] * (2 if config.get("bidirectional") else 1)
        real_hidden = config.get("proj_size") or 4
        h0 = torch.randn(layers, 2, real_hidden, dtype=dtype, requires_grad=True)
        c0 = torch.randn(layers, 2, 4, dtype=dtype, requires_grad=True)
        state = (h0, c0)
        inputs += [h0, c0]

    def run(module):
        torch.manual_seed(7)  # the same dropout masks for both
        out, (h_n, c_n) = module(x, state)
        return (out * out.detach().cos()).sum() + (h_n**2).sum() + c_n.sin().sum()

    expected = _gradient_penalty_grads(theirs, inputs, run)
    actual = _gradient_penalty_grads(ours, inputs, run)
    for k, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(
            a, e, **SECOND_ORDER_TOLERANCES[dtype], msg=lambda m, k=k: f"gradient {k}: {m}"
        )


def test_second_order_packed_input_matches_torch():
    theirs, ours = paired_lstms(torch.float64, input_size=3, hidden_size=4, bidirectional=True)
    x = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    lengths = [5, 2, 4]

    def run(module):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = module(packed)
        return (out.data**2).sum() + h_n.sum() + (c_n**2).sum()

    expected = _gradient_penalty_grads(theirs, [x], run)
    actual = _gradient_penalty_grads(ours, [x], run)
    for a, e in zip(actual, expected):
        assert_close(a, e, torch.float64, "packed second-order gradient")


def test_lstm_cell_second_order_matches_torch():
    theirs = torch.nn.LSTMCell(3, 4, dtype=torch.float64)
    ours = lstm_ext.LSTMCell.from_torch(theirs)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    cx = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)

    def run(module):
        h, c = module(x, (hx, cx))
        return (h**3).sum() + (c * h).sum()

    expected = _gradient_penalty_grads(theirs, [x, hx, cx], run)
    actual = _gradient_penalty_grads(ours, [x, hx, cx], run)
    for a, e in zip(actual, expected):
        assert_close(a, e, torch.float64, "LSTMCell second-order gradient")


def _functional_lstm(module):
    names = [name for name, _ in module.named_parameters()]

    def f(x, h0, c0, *params):
        params_by_name = dict(zip(names, params))
        out, (h_n, c_n) = torch.func.functional_call(module, params_by_name, (x, (h0, c0)))
        return out, h_n, c_n

    return f


@pytest.mark.parametrize(
    "config",
    [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=2), dict(bias=False)],
    ids=_config_id,
)
def test_gradgradcheck_lstm(config):
    lstm = lstm_ext.LSTM(2, 3, dtype=torch.float64, **config)
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    real_hidden = lstm.proj_size or 3
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers, 2, real_hidden, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(layers, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    args = (x, h0, c0, *params)
    assert gradcheck(_functional_lstm(lstm), args)
    assert gradgradcheck(_functional_lstm(lstm), args)


def test_gradgradcheck_lstm_cell():
    cell = lstm_ext.LSTMCell(2, 3, dtype=torch.float64)
    names = [name for name, _ in cell.named_parameters()]

    def f(x, hx, cx, *params):
        return torch.func.functional_call(cell, dict(zip(names, params)), (x, (hx, cx)))

    args = (
        torch.randn(2, 2, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
        *(p.detach().clone().requires_grad_() for p in cell.parameters()),
    )
    assert gradgradcheck(f, args)


def test_gradgradcheck_packed():
    lstm = lstm_ext.LSTM(2, 3, dtype=torch.float64)
    batch_sizes = torch.tensor([3, 2, 1])

    def f(data, *params):
        names = [name for name, _ in lstm.named_parameters()]
        packed = torch.nn.utils.rnn.PackedSequence(data, batch_sizes)
        out, (h_n, c_n) = torch.func.functional_call(lstm, dict(zip(names, params)), (packed,))
        return out.data, h_n, c_n

    data = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in lstm.parameters()]
    assert gradgradcheck(f, (data, *params))


def test_gradgradcheck_raw_forward_op():
    # torch.ops.lstm_ext.lstm_forward's own autograd (torch.library) is differentiable too.
    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    args = (make(3, 2, 2), make(2, 3), make(2, 3), make(12, 2), make(12, 3), make(12), make(12))

    def f(*tensors):
        out, h_n, c_n, *_ = torch.ops.lstm_ext.lstm_forward(*tensors, True, True)
        return out, h_n, c_n

    assert gradgradcheck(f, args)


def test_third_order_matches_torch():
    theirs, ours = paired_lstms(torch.float64, input_size=2, hidden_size=3)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)

    def third(module):
        out, _ = module(x)
        (g1,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        (g2,) = torch.autograd.grad((g1**2).sum(), x, create_graph=True)
        return torch.autograd.grad((g2**2).sum(), [x, *module.parameters()])

    for a, e in zip(third(ours), third(theirs)):
        assert_close(a, e, torch.float64, "third-order gradient")


def test_hessian_vector_product_matches_torch():
    theirs, ours = paired_lstms(torch.float64, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)

    def loss_of(module):
        return lambda inp: (module(inp)[0] ** 2).sum()

    _, hvp_theirs = torch.autograd.functional.hvp(loss_of(theirs), x, v)
    _, hvp_ours = torch.autograd.functional.hvp(loss_of(ours), x, v)
    assert_close(hvp_ours, hvp_theirs, torch.float64, "Hessian-vector product")


def test_first_order_backward_runs_the_fused_op_only():
    # A plain backward (no create_graph) must not touch the reference path: it calls the fused
    # backward op once per layer and direction, and no aten LSTM.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    lstm = lstm_ext.LSTM(3, 4, num_layers=2, bidirectional=True)
    out, _ = lstm(torch.randn(5, 2, 3, requires_grad=True))
    with Recorder() as recorder:
        out.sum().backward()
    assert sum("lstm_ext._lstm_backward" in op for op in recorder.ops) == 4
    assert not any("sigmoid" in op or "tanh" in op for op in recorder.ops), recorder.ops
