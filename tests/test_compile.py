"""torch.compile(fullgraph=True) of models containing lstm_ext.LSTM: eager's results, training and
inference, and no recompilation for every new sequence length or batch size (dynamic shapes).

Most tests compile with the aot_eager backend: it traces forward and backward through the fake
kernels with symbolic shapes exactly as inductor does, without inductor's C++ compile time. One
test runs inductor end to end.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

TOL = {"rtol": 1e-5, "atol": 1e-5}


class Model(torch.nn.Module):
    """An LSTM and a linear head on its last output and final states."""

    def __init__(self, **lstm_kwargs) -> None:
        super().__init__()
        self.lstm = lstm_ext.LSTM(4, 8, batch_first=True, **lstm_kwargs)
        directions = 2 if self.lstm.bidirectional else 1
        self.head = torch.nn.Linear((self.lstm.proj_size or 8) * directions, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, (h_n, c_n) = self.lstm(x)
        return self.head(output[:, -1]) + h_n.sum() + c_n.mean()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check_training_step(model: torch.nn.Module, compiled, x: torch.Tensor) -> None:
    expected, actual = model(x), compiled(x)
    torch.testing.assert_close(actual, expected, **TOL)
    inputs = [x, *model.parameters()]
    grads_e = torch.autograd.grad(expected.sum(), inputs)
    grads_a = torch.autograd.grad(actual.sum(), inputs)
    for a, e in zip(grads_a, grads_e):
        torch.testing.assert_close(a, e, **TOL)


# (N, T) pairs; N = 1 is left out: Dynamo specializes size-1 dimensions on purpose.
SHAPES = [(3, 5), (4, 7), (5, 9), (2, 6), (6, 3)]


@pytest.mark.parametrize("config", [{}, {"num_layers": 2, "bidirectional": True, "proj_size": 3}],
                         ids=["plain", "stacked-bidirectional-proj"])
def test_automatic_dynamic_compiles_once_more_then_never(config):
    # The first call compiles for its static shapes; the second, whose T and N differ, compiles a
    # dynamic graph; every later (N, T) reuses it. Inference (no_grad) is one more graph.
    model = Model(**config)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for batch, steps in SHAPES:
        _check_training_step(model, compiled, torch.randn(batch, steps, 4, requires_grad=True))
    assert counter.frame_count == 2
    with torch.no_grad():
        for batch, steps in SHAPES:
            x = torch.randn(batch, steps, 4)
            torch.testing.assert_close(compiled(x), model(x), **TOL)
    assert counter.frame_count == 3


def test_mark_dynamic_compiles_once():
    model = Model(num_layers=2)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for batch, steps in SHAPES:
        x = torch.randn(batch, steps, 4, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 1)
        _check_training_step(model, compiled, x)
    assert counter.frame_count == 1


def test_inductor_dynamic_training_and_inference():
    model = Model(num_layers=2, bidirectional=True, proj_size=3)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    compiled_after_first_shape = None
    for batch, steps in SHAPES[:3]:
        _check_training_step(model, compiled, torch.randn(batch, steps, 4, requires_grad=True))
        with torch.no_grad():
            x = torch.randn(batch, steps, 4)
            torch.testing.assert_close(compiled(x), model(x), **TOL)
        # Backend calls, not recompilations, are counted: with a cold inductor cache Dynamo may
        # call the backend twice for one frame. What matters: new shapes compile nothing.
        compiled_after_first_shape = compiled_after_first_shape or counter.frame_count
    assert counter.frame_count == compiled_after_first_shape


def test_eval_mode_and_initial_state_compile():
    lstm = lstm_ext.LSTM(4, 6, num_layers=2, dropout=0.3).eval()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lstm, fullgraph=True, backend=counter)
    for steps, batch in ((5, 3), (8, 2), (6, 4)):
        x = torch.randn(steps, batch, 4)
        hx = (torch.randn(2, batch, 6), torch.randn(2, batch, 6))
        actual, expected = compiled(x, hx), lstm(x, hx)
        torch.testing.assert_close(actual[0], expected[0], **TOL)
        torch.testing.assert_close(actual[1][1], expected[1][1], **TOL)
    assert counter.frame_count == 2


def test_packed_sequence_compiles_fullgraph():
    lstm = lstm_ext.LSTM(4, 8, num_layers=2, bidirectional=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lstm, fullgraph=True, backend=counter)
    for lengths in ([5, 3, 2], [6, 5, 3, 2], [4, 4, 1], [7, 2, 2, 2, 1]):
        padded = torch.randn(max(lengths), len(lengths), 4, requires_grad=True)
        packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
        (out_a, (h_a, c_a)), (out_e, (h_e, c_e)) = compiled(packed), lstm(packed)
        for a, e in ((out_a.data, out_e.data), (h_a, h_e), (c_a, c_e)):
            torch.testing.assert_close(a, e, **TOL)
        # Both runs hang off the same packing node: eager's gradient keeps it for the compiled
        # one (whose backward, with donated buffers, must not retain its graph).
        (grad_e,) = torch.autograd.grad(out_e.data.sum() + h_e.sum(), padded, retain_graph=True)
        (grad_a,) = torch.autograd.grad(out_a.data.sum() + h_a.sum(), padded)
        torch.testing.assert_close(grad_a, grad_e, **TOL)
    assert counter.frame_count == 2
