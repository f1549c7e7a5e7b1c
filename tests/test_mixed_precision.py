"""torch.autocast on the CPU: lstm_ext.LSTM / LSTMCell cast what torch.nn.LSTM / LSTMCell cast,
return the dtypes they return, and are as accurate (error against a float64 run at most twice
torch's). The CUDA counterparts are in test_cuda.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import lstm_ext

CONFIGS = {
    "plain": dict(),
    "projections": dict(proj_size=3),
    "stacked-bidirectional": dict(num_layers=2, bidirectional=True),
}


def _run_torch(module, *args):
    """torch.nn.LSTM's result under CPU autocast, also on CPUs where its oneDNN path cannot run.

    oneDNN has no bfloat16 (or float16) LSTM without AVX-512 (on an AMD Zen 3, for one), and
    torch 2.13 then raises "could not create a primitive descriptor". Where it runs, that path
    casts the input, the state and the weights to the autocast dtype and computes in it; there
    we do the same casts by hand (differentiably, so gradients reach the float32 parameters)
    and run torch's native path with autocast off.
    """
    try:
        return module(*args)
    except RuntimeError as error:
        if "could not create a primitive descriptor" not in str(error):
            raise
    lower = torch.get_autocast_dtype("cpu")
    cast = lambda t: t.to(lower) if t.is_floating_point() and t.dtype != torch.float64 else t
    parameters = {name: cast(p) for name, p in module.named_parameters()}
    args = [tuple(cast(t) for t in a) if isinstance(a, tuple) else cast(a) for a in args]
    with torch.autocast("cpu", enabled=False), torch.backends.mkldnn.flags(enabled=False):
        return torch.func.functional_call(module, parameters, tuple(args))


def _dtypes(result) -> tuple[torch.dtype, ...]:
    output, (h_n, c_n) = result
    output = output.data if isinstance(output, PackedSequence) else output
    return output.dtype, h_n.dtype, c_n.dtype


def _state(lstm: torch.nn.LSTM, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    layers = lstm.num_layers * (2 if lstm.bidirectional else 1)
    return (torch.randn(layers, batch, lstm.proj_size or lstm.hidden_size, dtype=dtype),
            torch.randn(layers, batch, lstm.hidden_size, dtype=dtype))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("call", ["no state", "float32 state", "bfloat16 state", "packed",
                                  "packed with state", "unbatched"])
def test_cpu_autocast_dtypes_match_torch(config, call):
    theirs = torch.nn.LSTM(4, 6, **config)
    ours = lstm_ext.LSTM.from_torch(theirs)
    x = torch.randn(5, 3, 4)
    args = {
        "no state": lambda: (x,),
        "float32 state": lambda: (x, _state(theirs, 3, torch.float32)),
        "bfloat16 state": lambda: (x, _state(theirs, 3, torch.bfloat16)),
        "packed": lambda: (pack_padded_sequence(x, [5, 3, 2]),),
        "packed with state": lambda: (pack_padded_sequence(x, [5, 3, 2]),
                                      _state(theirs, 3, torch.float32)),
        "unbatched": lambda: (x[:, 0],),
    }[call]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = _run_torch(theirs, *args), ours(*args)
    assert _dtypes(actual) == _dtypes(expected)
    # Within bfloat16's precision of torch's values.
    for a, e in zip(_flatten(actual), _flatten(expected)):
        torch.testing.assert_close(a.float(), e.float(), rtol=0.05, atol=0.05)


def _flatten(result) -> list[torch.Tensor]:
    output, (h_n, c_n) = result
    return [output.data if isinstance(output, PackedSequence) else output, h_n, c_n]


def test_cpu_autocast_lstm_cell_is_not_cast_like_torch():
    theirs = torch.nn.LSTMCell(4, 6)
    ours = lstm_ext.LSTMCell.from_torch(theirs)
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = theirs(x), ours(x)
    assert [t.dtype for t in actual] == [t.dtype for t in expected] == [torch.float32] * 2


def _errors(module, x, reference, reference_grads, **autocast):
    with torch.autocast("cpu", **autocast):
        output, _ = (_run_torch(module, x) if isinstance(module, torch.nn.LSTM)
                     else module(x))
    grads = torch.autograd.grad(output.float().square().sum(), list(module.parameters()))
    assert all(g.dtype == p.dtype for g, p in zip(grads, module.parameters()))
    output_error = (output.double() - reference).abs().max().item()
    grad_error = max(((g.double() - r).abs().max() / r.abs().max()).item()
                     for g, r in zip(grads, reference_grads))
    return output.dtype, output_error, grad_error


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_cpu_autocast_bfloat16_as_accurate_as_torch(config):
    theirs = torch.nn.LSTM(8, 16, **config)
    ours = lstm_ext.LSTM.from_torch(theirs)
    reference_module = copy.deepcopy(theirs).double()
    x = torch.randn(20, 4, 8)
    reference = reference_module(x.double())[0]
    reference_grads = torch.autograd.grad(reference.square().sum(),
                                          list(reference_module.parameters()))
    dtype_t, out_t, grad_t = _errors(theirs, x, reference, reference_grads, dtype=torch.bfloat16)
    dtype_o, out_o, grad_o = _errors(ours, x, reference, reference_grads, dtype=torch.bfloat16)
    assert dtype_o == dtype_t == torch.bfloat16
    assert out_o <= 2 * out_t, (out_o, out_t)
    assert grad_o <= 2 * grad_t, (grad_o, grad_t)


def test_cpu_autocast_float16_runs_in_float16():
    # torch 2.13's oneDNN LSTM fails under CPU float16 autocast ("could not create a primitive
    # descriptor"); ours runs, in float16 as for bfloat16, as accurately as torch's native path.
    theirs = torch.nn.LSTM(8, 16, num_layers=2)
    ours = lstm_ext.LSTM.from_torch(theirs)
    reference_module = copy.deepcopy(theirs).double()
    x = torch.randn(20, 4, 8)
    reference = reference_module(x.double())[0]
    reference_grads = torch.autograd.grad(reference.square().sum(),
                                          list(reference_module.parameters()))
    with torch.backends.mkldnn.flags(enabled=False):
        _, out_t, grad_t = _errors(theirs, x, reference, reference_grads, dtype=torch.float16)
    dtype_o, out_o, grad_o = _errors(ours, x, reference, reference_grads, dtype=torch.float16)
    assert dtype_o == torch.float16
    assert out_o <= 2 * out_t and grad_o <= 2 * grad_t, (out_o, out_t, grad_o, grad_t)


def test_cpu_autocast_leaves_float64_alone_like_torch():
    theirs = torch.nn.LSTM(4, 6).double()
    ours = lstm_ext.LSTM.from_torch(theirs)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = theirs(x), ours(x)
    assert _dtypes(actual) == _dtypes(expected) == (torch.float64,) * 3
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-10, atol=1e-10)
