"""The oracle for cells without a fused kernel: lstm_ext.reference's GRU against torch.nn.GRU and
GRUCell."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES
from torch.nn.utils.rnn import pack_padded_sequence

from lstm_ext import reference

f64 = torch.float64


def _randn(*shape: int, dtype: torch.dtype = f64, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _assert_all_close(actual, expected, dtype: torch.dtype = f64) -> None:
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, **TOLERANCES[dtype], msg=lambda m, i=index: f"#{i}: {m}")


def _grads(outputs, inputs) -> tuple[torch.Tensor, ...]:
    """Gradients of a loss that weighs every output differently.

    The graph is kept: the two sides compared may share part of it (a pack_padded_sequence).
    """
    loss = sum((out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum()
               for out in outputs)
    return torch.autograd.grad(loss, inputs, retain_graph=True)


# --- GRU ------------------------------------------------------------------------------------

GRU_CONFIGS = {
    "1 layer": dict(num_layers=1),
    "2 layers bidirectional": dict(num_layers=2, bidirectional=True),
    "no bias": dict(num_layers=2, bidirectional=True, bias=False),
    "batch_first": dict(num_layers=1, batch_first=True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", GRU_CONFIGS.values(), ids=GRU_CONFIGS.keys())
def test_gru_matches_torch(config, dtype):
    gru = torch.nn.GRU(5, 6, **config, dtype=dtype)
    directions = 2 if gru.bidirectional else 1
    x = _randn(*((3, 4, 5) if gru.batch_first else (4, 3, 5)), dtype=dtype, grad=True)
    h0 = _randn(gru.num_layers * directions, 3, 6, dtype=dtype, grad=True)
    expected = gru(x, h0)
    actual = reference.gru(
        x, h0, gru._flat_weights, gru.bias, gru.num_layers, 0.0, False, gru.bidirectional,
        gru.batch_first,
    )
    _assert_all_close(actual, expected, dtype)
    inputs = [x, h0, *gru._flat_weights]
    _assert_all_close(_grads(actual, inputs), _grads(expected, inputs), dtype)


def test_gru_packed_matches_torch():
    gru = torch.nn.GRU(5, 6, 2, bidirectional=True, dtype=f64)
    x = _randn(5, 4, 5, grad=True)
    h0 = _randn(4, 4, 6, grad=True)
    # Unsorted lengths: torch.nn.GRU sorts the batch; the reference, like torch._VF.gru, takes
    # the sorted one, so permute h0 into it and h_n back out of it here.
    sequence = pack_padded_sequence(x, [2, 5, 1, 4], enforce_sorted=False)
    output, h_n = gru(sequence, h0)
    ref_output, ref_h = reference.gru(
        sequence.data, h0[:, sequence.sorted_indices], gru._flat_weights, True, 2, 0.0, False,
        True, False, batch_sizes=sequence.batch_sizes,
    )
    actual = (ref_output, ref_h[:, sequence.unsorted_indices])
    _assert_all_close(actual, (output.data, h_n))
    inputs = [x, h0, *gru._flat_weights]
    _assert_all_close(_grads(actual, inputs), _grads((output.data, h_n), inputs))


@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell_matches_torch(bias):
    cell = torch.nn.GRUCell(5, 6, bias=bias, dtype=f64)
    x, hx = _randn(3, 5, grad=True), _randn(3, 6, grad=True)
    expected = cell(x, hx)
    actual = reference.gru_cell(x, hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    _assert_all_close([actual], [expected])
    inputs = [x, hx, *cell.parameters()]
    _assert_all_close(_grads([actual], inputs), _grads([expected], inputs))


def test_gru_layer_packed_reverse_gradcheck():
    batch_sizes = torch.tensor([3, 2, 1])
    inputs = (_randn(6, 2, grad=True), _randn(3, 2, grad=True), _randn(6, 2, grad=True),
              _randn(6, 2, grad=True), _randn(6, grad=True), _randn(6, grad=True))

    def layer(x, h0, w_ih, w_hh, b_ih, b_hh):
        return reference.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, reverse=True,
                                   batch_sizes=batch_sizes)

    assert torch.autograd.gradcheck(layer, inputs)
