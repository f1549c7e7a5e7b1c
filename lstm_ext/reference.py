"""The LSTM in plain PyTorch ops: the oracle for tests and a baseline for benchmarks.

Same math as ``torch.nn.LSTM`` (gate order i, f, g, o) and the same calling convention as
:func:`lstm_ext.functional.lstm`, with the input projection hoisted out of the time loop as the
fused kernels do. Autograd differentiates it, to any order. It is itself tested equal to
``torch.nn.LSTM``.

The oracle for cells without a fused kernel yet: :func:`gru` (``torch.nn.GRU``'s math and
``torch._VF.gru``'s arguments).

Shapes: ``T`` time, ``N`` batch, ``C`` input size, ``H`` hidden size, ``P`` projection size
(``P = H`` without projections), ``L`` layers, ``D`` directions; ``rows`` the rows of a packed
batch (the sum of its batch_sizes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gru",
    "gru_cell",
    "gru_layer",
    "lstm",
    "lstm_cell",
    "lstm_layer",
]


def _cell_update(gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def lstm_cell(
    input: Tensor,
    hx: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step: input ``[N, C]``, hx = (h ``[N, H]``, c ``[N, H]``) -> (h', c')."""
    h, c = hx
    gates = input @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    return _cell_update(gates, c)


def lstm_layer(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    reverse: bool = False,
    w_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction: input ``[T, N, C]`` -> (output ``[T, N, P]``, h_n, c_n).

    With w_hr ``[P, H]`` each step's h is projected; with batch_sizes the input is a packed batch
    ``[rows, C]`` (step t runs the first ``batch_sizes[t]`` sequences) and so is the output, and
    h_n / c_n hold each sequence's state after its own last step.
    """
    projected = input @ w_ih.t()
    if b_ih is not None:
        projected = projected + (b_ih + b_hh)
    batch = h0.size(0)
    if batch_sizes is None:
        # unbind, not projected[t]: indexing in the loop makes autograd's backward quadratic in T.
        steps = list(projected.unbind(0))
        sizes = [batch] * len(steps)
    else:
        sizes = [int(n) for n in batch_sizes]
        steps = list(projected.split(sizes))
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    h, c = h0, c0
    outputs: list[Tensor] = [h0] * len(steps)
    for t in order:
        rows = sizes[t]
        h_t, c_t = _cell_update(steps[t] + h[:rows] @ w_hh.t(), c[:rows])
        if w_hr is not None:
            h_t = h_t @ w_hr.t()
        outputs[t] = h_t
        if rows < batch:
            # Rows past this step's batch keep their state: sequences that have ended keep their
            # final state, those that start later (reverse direction) their initial state.
            h_t, c_t = torch.cat([h_t, h[rows:]]), torch.cat([c_t, c[rows:]])
        h, c = h_t, c_t
    output = torch.stack(outputs) if batch_sizes is None else torch.cat(outputs)
    return output, h, c


def lstm(
    input: Tensor,
    hx: tuple[Tensor, Tensor],
    weights: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A stacked, optionally bidirectional LSTM; the arguments of ``torch._VF.lstm``.

    Args:
        input: ``[T, N, C]`` (``[N, T, C]`` if batch_first), or with batch_sizes a packed batch
            ``[rows, C]``.
        hx: (h0 ``[L*D, N, P]``, c0 ``[L*D, N, H]``).
        weights: ``torch.nn.LSTM``'s flat weight list, layer by layer, direction by direction:
            w_ih, w_hh, then b_ih, b_hh if has_biases, then w_hr with projections.
        batch_sizes: a ``PackedSequence``'s batch_sizes, or None.

    Returns:
        (output ``[T, N, D*P]`` or ``[N, T, D*P]``, packed ``[rows, D*P]``; h_n ``[L*D, N, P]``;
        c_n ``[L*D, N, H]``).
    """
    directions = 2 if bidirectional else 1
    per_cell = 4 if has_biases else 2
    projected = len(weights) == num_layers * directions * (per_cell + 1)
    per_cell += int(projected)
    h0, c0 = hx
    packed = batch_sizes is not None
    layer_input = input.transpose(0, 1) if batch_first and not packed else input
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            w = list(weights[index * per_cell : (index + 1) * per_cell])
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            out, h, c = lstm_layer(
                layer_input, h0[index], c0[index], w[0], w[1], b_ih, b_hh,
                reverse=direction == 1, w_hr=w[-1] if projected else None, batch_sizes=batch_sizes,
            )
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    output = layer_input.transpose(0, 1) if batch_first and not packed else layer_input
    return output, torch.stack(h_n), torch.stack(c_n)


def _time_steps(
    projected: Tensor, batch: int, batch_sizes: Tensor | None, reverse: bool
) -> tuple[list[Tensor], list[int], range]:
    """A layer's hoisted input projection cut into steps: (steps, rows per step, step order)."""
    if batch_sizes is None:
        # unbind, not projected[t]: indexing in the loop makes autograd's backward quadratic in T.
        steps = list(projected.unbind(0))
        sizes = [batch] * len(steps)
    else:
        sizes = [int(n) for n in batch_sizes]
        steps = list(projected.split(sizes))
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    return steps, sizes, order


def _gru_update(input_gates: Tensor, hidden_gates: Tensor, h_prev: Tensor) -> Tensor:
    i_r, i_z, i_n = input_gates.chunk(3, dim=1)
    h_r, h_z, h_n = hidden_gates.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    # b_hn sits inside hidden_gates, so the reset gate scales it too, as torch.nn.GRU's does.
    n = torch.tanh(i_n + r * h_n)
    # (1 - z) * n + z * h_prev, in the order torch's kernels round it.
    return n + z * (h_prev - n)


def gru_cell(
    input: Tensor,
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """One GRU step (gate order r, z, n): input ``[N, C]``, hx ``[N, H]`` -> h' ``[N, H]``.

    w_ih ``[3H, C]``, w_hh ``[3H, H]``, b_ih and b_hh ``[3H]``.
    """
    input_gates = input @ w_ih.t()
    hidden_gates = hx @ w_hh.t()
    if b_ih is not None:
        input_gates = input_gates + b_ih
        hidden_gates = hidden_gates + b_hh
    return _gru_update(input_gates, hidden_gates, hx)


def gru_layer(
    input: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    reverse: bool = False,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One GRU layer, one direction: input ``[T, N, C]``, h0 ``[N, H]`` -> (output ``[T, N, H]``,
    h_n ``[N, H]``).

    With batch_sizes the input is a packed batch ``[rows, C]`` and so is the output, as in
    :func:`lstm_layer`.
    """
    # Only b_ih joins the hoisted projection: b_hh must stay with h @ w_hh^T, whose n part the
    # reset gate scales.
    projected = input @ w_ih.t()
    if b_ih is not None:
        projected = projected + b_ih
    batch = h0.size(0)
    steps, sizes, order = _time_steps(projected, batch, batch_sizes, reverse)
    h = h0
    outputs: list[Tensor] = [h0] * len(steps)
    for t in order:
        rows = sizes[t]
        hidden_gates = h[:rows] @ w_hh.t()
        if b_hh is not None:
            hidden_gates = hidden_gates + b_hh
        h_t = _gru_update(steps[t], hidden_gates, h[:rows])
        outputs[t] = h_t
        if rows < batch:
            # Rows past this step's batch keep their state, as in lstm_layer.
            h_t = torch.cat([h_t, h[rows:]])
        h = h_t
    output = torch.stack(outputs) if batch_sizes is None else torch.cat(outputs)
    return output, h


def gru(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A stacked, optionally bidirectional GRU; the arguments of ``torch._VF.gru``.

    Args:
        input: ``[T, N, C]`` (``[N, T, C]`` if batch_first), or with batch_sizes a packed batch
            ``[rows, C]``.
        hx: h0 ``[L*D, N, H]``.
        weights: ``torch.nn.GRU``'s flat weight list (its ``_flat_weights``), layer by layer,
            direction by direction: w_ih ``[3H, C]``, w_hh ``[3H, H]``, then b_ih, b_hh ``[3H]``
            if has_biases.
        batch_sizes: a ``PackedSequence``'s batch_sizes, or None.

    Returns:
        (output ``[T, N, D*H]`` or ``[N, T, D*H]``, packed ``[rows, D*H]``; h_n ``[L*D, N, H]``).
    """
    directions = 2 if bidirectional else 1
    per_cell = 4 if has_biases else 2
    packed = batch_sizes is not None
    layer_input = input.transpose(0, 1) if batch_first and not packed else input
    h_n = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            w = list(weights[index * per_cell : (index + 1) * per_cell])
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            out, h = gru_layer(
                layer_input, hx[index], w[0], w[1], b_ih, b_hh,
                reverse=direction == 1, batch_sizes=batch_sizes,
            )
            outputs.append(out)
            h_n.append(h)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    output = layer_input.transpose(0, 1) if batch_first and not packed else layer_input
    return output, torch.stack(h_n)

