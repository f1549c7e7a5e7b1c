"""The oracle first: lstm_ext.reference equals torch.nn.LSTM / LSTMCell with the same weights."""

from __future__ import annotations

import pytest
import torch

from lstm_ext import reference


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_reference_lstm_matches_torch(num_layers, bidirectional, bias, batch_first):
    lstm = torch.nn.LSTM(
        5, 7, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional
    ).double()
    directions = 2 if bidirectional else 1
    steps, batch = 4, 3
    x_shape = (batch, steps, 5) if batch_first else (steps, batch, 5)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(num_layers * directions, batch, 7, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(num_layers * directions, batch, 7, dtype=torch.float64, requires_grad=True)
    expected, (h_n, c_n) = lstm(x, (h0, c0))
    weights = [getattr(lstm, name) for name in lstm._flat_weights_names]
    actual, ref_h, ref_c = reference.lstm(
        x, (h0, c0), weights, bias, num_layers, 0.0, False, bidirectional, batch_first
    )
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_h, h_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_c, c_n, rtol=1e-12, atol=1e-12)
    inputs = [x, h0, c0, *weights]
    loss_t = expected.square().sum() + h_n.sum() + c_n.square().sum()
    loss_r = actual.square().sum() + ref_h.sum() + ref_c.square().sum()
    for g_r, g_t in zip(torch.autograd.grad(loss_r, inputs), torch.autograd.grad(loss_t, inputs)):
        torch.testing.assert_close(g_r, g_t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_reference_cell_matches_torch(bias):
    cell = torch.nn.LSTMCell(5, 6, bias=bias).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    hx = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    h, c = cell(x, hx)
    ref_h, ref_c = reference.lstm_cell(
        x, hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
    )
    torch.testing.assert_close(ref_h, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_c, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_reference_projections_and_packed_match_torch(packed, proj_size, bidirectional):
    lstm = torch.nn.LSTM(5, 7, 2, bidirectional=bidirectional, proj_size=proj_size).double()
    directions = 2 if bidirectional else 1
    lengths = [4, 4, 2, 1]
    x = torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * directions, 4, proj_size or 7, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2 * directions, 4, 7, dtype=torch.float64, requires_grad=True)
    weights = [getattr(lstm, name) for name in lstm._flat_weights_names]
    if packed:
        sequence = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
        expected, (h_n, c_n) = lstm(sequence, (h0, c0))
        expected = expected.data
        actual, ref_h, ref_c = reference.lstm(
            sequence.data,
            (h0, c0),
            weights,
            True,
            2,
            0.0,
            False,
            bidirectional,
            False,
            batch_sizes=sequence.batch_sizes,
        )
    else:
        expected, (h_n, c_n) = lstm(x, (h0, c0))
        actual, ref_h, ref_c = reference.lstm(
            x, (h0, c0), weights, True, 2, 0.0, False, bidirectional, False
        )
    for a, e in ((actual, expected), (ref_h, h_n), (ref_c, c_n)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    inputs = [x, h0, c0, *weights]
    loss_t = expected.square().sum() + h_n.sum() + c_n.square().sum()
    loss_r = actual.square().sum() + ref_h.sum() + ref_c.square().sum()
    grads_t = torch.autograd.grad(loss_t, inputs, retain_graph=True)
    for g_r, g_t in zip(torch.autograd.grad(loss_r, inputs), grads_t):
        torch.testing.assert_close(g_r, g_t, rtol=1e-10, atol=1e-10)
