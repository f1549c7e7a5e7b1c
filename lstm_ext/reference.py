"""The LSTM in plain PyTorch ops: the oracle for tests and a baseline for benchmarks.

Same math as ``torch.nn.LSTM`` (gate order i, f, g, o) and the same calling convention as
:func:`lstm_ext.functional.lstm`, with the input projection hoisted out of the time loop as the
fused kernels do. Autograd differentiates it, to any order. It is itself tested equal to
``torch.nn.LSTM``.

The oracle for cells without a fused kernel yet: :func:`gru` (``torch.nn.GRU``'s math and
``torch._VF.gru``'s arguments) and :func:`lstm_variant_layer`, the LSTM with peepholes, coupled
input and forget gates, layer normalization and zoneout, each optional.

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
    "lstm_layernorm_recurrence",
    "lstm_variant_cell",
    "lstm_variant_layer",
    "zoneout_masks",
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


# torch.nn.functional.layer_norm's default.
LAYER_NORM_EPS = 1e-5


def zoneout_masks(
    rows: int,
    hidden: int,
    p: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Zoneout's masks for a layer: (mask_h, mask_c), each ``[rows, H]`` of 0 and 1.

    1 keeps the unit's previous value. Each entry is 1 with probability p, drawn with
    ``torch.bernoulli`` on a full tensor of p, mask_h first, so that a draw is reproducible under
    ``torch.manual_seed`` (or generator) and a fused kernel that calls this function sees the
    masks the reference sees. rows: ``T*N`` for a padded batch, ``sum(batch_sizes)`` for a packed
    one, in the layer's time-major row order.
    """
    _check_zoneout(p)
    probability = torch.full((rows, hidden), float(p), device=device, dtype=dtype)
    mask_h = torch.bernoulli(probability, generator=generator)
    mask_c = torch.bernoulli(probability, generator=generator)
    return mask_h, mask_c


# The layers' keyword argument zoneout_masks shadows the function inside them.
_draw_zoneout_masks = zoneout_masks


def _check_zoneout(p: float) -> None:
    if isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"zoneout must be a probability in [0, 1), got {p!r}")


def _check_variant(
    hidden: int,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    peephole: Tensor | None,
    coupled_gates: bool,
    layer_norm: dict[str, Tensor] | None,
    zoneout: float,
    training: bool,
    zoneout_masks: tuple[Tensor, Tensor] | None,
) -> None:
    gates = 3 if coupled_gates else 4
    for name, tensor in (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)):
        if tensor is not None and tensor.size(0) != gates * hidden:
            order = "i, g, o" if coupled_gates else "i, f, g, o"
            raise ValueError(
                f"with coupled_gates={coupled_gates} {name} must have {gates}*H = "
                f"{gates * hidden} rows (gate order {order}, H = {hidden}), got {tensor.size(0)}"
            )
    if peephole is not None and tuple(peephole.shape) != (3, hidden):
        raise ValueError(
            f"peephole must be [3, H] = [3, {hidden}] (rows w_ci, w_cf, w_co), "
            f"got {list(peephole.shape)}"
        )
    if layer_norm is not None:
        sizes = {"weight_ih": gates * hidden, "weight_hh": gates * hidden, "weight_c": hidden,
                 "bias_c": hidden}
        if set(layer_norm) != set(sizes):
            raise ValueError(
                f"layer_norm must have the keys {sorted(sizes)}, got {sorted(layer_norm)}"
            )
        for key, size in sizes.items():
            if tuple(layer_norm[key].shape) != (size,):
                raise ValueError(
                    f"layer_norm[{key!r}] must be [{size}], got {list(layer_norm[key].shape)}"
                )
    _check_zoneout(zoneout)
    if zoneout_masks is not None and not training:
        raise ValueError(
            "zoneout_masks are for training; with training=False zoneout takes its expectation"
        )
    if w_hr is not None:
        others = [
            name for name, on in (
                ("layer_norm", layer_norm is not None),
                ("zoneout", zoneout > 0 or zoneout_masks is not None),
            ) if on
        ]
        if others:
            raise ValueError(
                f"projections (w_hr) are supported with peephole and coupled_gates only, not with "
                f"{' and '.join(others)}"
            )


def _zoneout_keep(
    zoneout: float,
    training: bool,
    zoneout_masks: tuple[Tensor, Tensor] | None,
    rows: int,
    hidden: int,
    like: Tensor,
) -> tuple[Tensor | float, Tensor | float] | None:
    """The weight of each unit's previous value, (for h, for c), or None without zoneout."""
    if not training:
        return (zoneout, zoneout) if zoneout > 0 else None
    if zoneout_masks is None:
        if zoneout == 0:
            return None
        return _draw_zoneout_masks(rows, hidden, zoneout, device=like.device, dtype=like.dtype)
    for name, mask in zip(("mask_h", "mask_c"), zoneout_masks):
        if tuple(mask.shape) != (rows, hidden):
            raise ValueError(
                f"zoneout_masks' {name} must be [rows, H] = [{rows}, {hidden}], "
                f"got {list(mask.shape)}"
            )
    return zoneout_masks[0], zoneout_masks[1]


def _variant_input_part(
    input: Tensor,
    w_ih: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    layer_norm: dict[str, Tensor] | None,
) -> Tensor:
    """The input's share of the pre-activations, with both biases.

    Layer norm normalizes each row of x W_ih^T on its own, so this still hoists out of the time
    loop. The biases come after it: added to either share or to their sum, it is the same.
    """
    part = input @ w_ih.t()
    if layer_norm is not None:
        part = F.layer_norm(part, part.shape[-1:], layer_norm["weight_ih"], eps=LAYER_NORM_EPS)
    if b_ih is not None:
        part = part + (b_ih + b_hh)
    return part


def _variant_step(
    input_part: Tensor,
    h_prev: Tensor,
    c_prev: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    peephole: tuple[Tensor, Tensor, Tensor] | None,
    coupled_gates: bool,
    layer_norm: dict[str, Tensor] | None,
    keep: tuple[Tensor | float, Tensor | float] | None,
) -> tuple[Tensor, Tensor]:
    """One step from the step's input share of the pre-activations: (h, c) for ``[rows, H]``.

    With all options off the ops and their order are _cell_update's, so the result is the same
    to the last bit.
    """
    hidden_part = h_prev @ w_hh.t()
    if layer_norm is not None:
        hidden_part = F.layer_norm(
            hidden_part, hidden_part.shape[-1:], layer_norm["weight_hh"], eps=LAYER_NORM_EPS
        )
    gates = input_part + hidden_part
    if coupled_gates:
        i, g, o = gates.chunk(3, dim=1)
    else:
        i, f, g, o = gates.chunk(4, dim=1)
    if peephole is not None:
        w_ci, w_cf, w_co = peephole
        i = i + w_ci * c_prev
        if not coupled_gates:
            f = f + w_cf * c_prev
    i = torch.sigmoid(i)
    forget = 1 - i if coupled_gates else torch.sigmoid(f)
    c = forget * c_prev + i * torch.tanh(g)
    if peephole is not None:
        # The output gate looks at the new cell state.
        o = o + w_co * c
    if layer_norm is not None:
        c_out = F.layer_norm(
            c, c.shape[-1:], layer_norm["weight_c"], layer_norm["bias_c"], eps=LAYER_NORM_EPS
        )
    else:
        c_out = c
    h = torch.sigmoid(o) * torch.tanh(c_out)
    if w_hr is not None:
        h = h @ w_hr.t()
    if keep is not None:
        keep_h, keep_c = keep
        h = keep_h * h_prev + (1 - keep_h) * h
        c = keep_c * c_prev + (1 - keep_c) * c
    return h, c


def lstm_variant_cell(
    input: Tensor,
    hx: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    peephole: Tensor | None = None,
    coupled_gates: bool = False,
    layer_norm: dict[str, Tensor] | None = None,
    zoneout: float = 0.0,
    training: bool = False,
    zoneout_masks: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of :func:`lstm_variant_layer`: input ``[N, C]``, hx = (h ``[N, H]``, c ``[N, H]``)
    -> (h', c').

    The options are lstm_variant_layer's; zoneout_masks here are each ``[N, H]``.
    """
    h, c = hx
    hidden = c.size(-1)
    _check_variant(hidden, w_ih, w_hh, b_ih, b_hh, None, peephole, coupled_gates, layer_norm,
                   zoneout, training, zoneout_masks)
    keep = _zoneout_keep(zoneout, training, zoneout_masks, input.size(0), hidden, input)
    return _variant_step(
        _variant_input_part(input, w_ih, b_ih, b_hh, layer_norm), h, c, w_hh, None,
        None if peephole is None else tuple(peephole.unbind(0)), coupled_gates, layer_norm, keep,
    )


def lstm_variant_layer(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    *,
    reverse: bool = False,
    w_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None,
    peephole: Tensor | None = None,
    coupled_gates: bool = False,
    layer_norm: dict[str, Tensor] | None = None,
    zoneout: float = 0.0,
    training: bool = False,
    zoneout_masks: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer with optional peepholes, coupled gates, layer norm and zoneout.

    input ``[T, N, C]`` (or packed ``[rows, C]`` with batch_sizes), h0 ``[N, P]``, c0 ``[N, H]``
    -> (output ``[T, N, P]`` or ``[rows, P]``, h_n, c_n), with reverse, w_hr and batch_sizes as
    in :func:`lstm_layer`. With every option off it is lstm_layer, to the last bit. ``G = 4``
    gates (i, f, g, o), or 3 (i, g, o) with coupled_gates; pre_i, pre_f, pre_o below are the
    gates' pre-activations.

    Args:
        peephole: ``[3, H]``, rows (w_ci, w_cf, w_co): i = σ(pre_i + w_ci * c_{t-1}),
            f = σ(pre_f + w_cf * c_{t-1}), o = σ(pre_o + w_co * c_t), o reading the new cell
            state (ONNX LSTM's P, oneDNN's and TensorFlow's form). With coupled_gates the w_cf row
            goes unused, as in ONNX.
        coupled_gates: CIFG: w_ih, w_hh, b_ih, b_hh have ``3H`` rows (i, g, o) and f = 1 - i.
        layer_norm: Ba et al.'s LSTM layer normalization (haste's LayerNormLSTM), a dict of
            "weight_ih" ``[G*H]`` and "weight_hh" ``[G*H]``: the gains of the normalizations of
            x W_ih^T and h W_hh^T, each over its G*H pre-activations, without a bias of their own
            (b_ih + b_hh come after them); "weight_c" and "bias_c" ``[H]``: those of the
            normalization of c_t in h_t = o * tanh(LN(c_t)). The recurrence carries the
            un-normalized c_t. eps 1e-5.
        zoneout: p in [0, 1) (Krueger et al.): in training each unit of h and of c keeps its
            previous value with probability p, h_t = m_h * h_{t-1} + (1 - m_h) * h_new (c
            likewise with its own mask), h_new and the output gate's peephole computed from the
            new, not yet zoned-out c; in eval the expectation p * prev + (1 - p) * new. The
            output at step t is the zoned-out h_t.
        training: draw zoneout's masks (True) or take its expectation (False).
        zoneout_masks: in training, (mask_h, mask_c) each ``[rows, H]`` in the layer's
            time-major row order (``rows = T*N`` padded), 1 to keep; None draws them with
            :func:`zoneout_masks`.
        w_hr: projections, with peephole and coupled_gates only: h_t = (o * tanh(c_t)) W_hr^T.

    Raises:
        ValueError: weights with other than G*H rows, a peephole not ``[3, H]``, layer_norm
            with other keys or shapes, zoneout outside [0, 1), zoneout_masks in eval or not
            ``[rows, H]``, w_hr with layer_norm or zoneout.
    """
    hidden = c0.size(-1)
    _check_variant(hidden, w_ih, w_hh, b_ih, b_hh, w_hr, peephole, coupled_gates, layer_norm,
                   zoneout, training, zoneout_masks)
    return _variant_recurrence(
        _variant_input_part(input, w_ih, b_ih, b_hh, layer_norm), h0, c0, w_hh, reverse, w_hr,
        batch_sizes, peephole, coupled_gates, layer_norm, zoneout, training, zoneout_masks,
    )


def lstm_layernorm_recurrence(
    input_part: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    weight_hh: Tensor,
    weight_c: Tensor,
    bias_c: Tensor,
    *,
    reverse: bool = False,
    batch_sizes: Tensor | None = None,
    peephole: Tensor | None = None,
    coupled_gates: bool = False,
    zoneout: float = 0.0,
    training: bool = False,
    zoneout_masks: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The recurrence of a layer-norm :func:`lstm_variant_layer` from the input's share of the
    pre-activations, ``input_part = layer_norm(x W_ih^T) weight_ih + b_ih + b_hh`` ``[T, N, G*H]``
    (packed ``[rows, G*H]``): what ``lstm_ext::lstm_layernorm_forward`` computes. weight_hh
    ``[G*H]``, weight_c and bias_c ``[H]`` are layer_norm's other three entries; the options as
    lstm_variant_layer's."""
    layer_norm = {"weight_hh": weight_hh, "weight_c": weight_c, "bias_c": bias_c}
    _check_zoneout(zoneout)
    return _variant_recurrence(input_part, h0, c0, w_hh, reverse, None, batch_sizes, peephole,
                               coupled_gates, layer_norm, zoneout, training, zoneout_masks)


def _variant_recurrence(
    input_part: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    reverse: bool,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    peephole: Tensor | None,
    coupled_gates: bool,
    layer_norm: dict[str, Tensor] | None,
    zoneout: float,
    training: bool,
    zoneout_masks: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """lstm_variant_layer's time loop, from the input's share of the pre-activations."""
    hidden = c0.size(-1)
    batch = h0.size(0)
    steps, sizes, order = _time_steps(input_part, batch, batch_sizes, reverse)
    keep = _zoneout_keep(zoneout, training, zoneout_masks, sum(sizes), hidden, input_part)
    if keep is None:
        keeps: list[tuple[Tensor | float, Tensor | float] | None] = [None] * len(steps)
    elif training:
        # The masks' rows are the input's: cut them into steps the same way.
        keeps = list(zip(*(mask.split(sizes) for mask in keep)))
    else:
        keeps = [keep] * len(steps)
    peepholes = None if peephole is None else tuple(peephole.unbind(0))
    h, c = h0, c0
    outputs: list[Tensor] = [h0] * len(steps)
    for t in order:
        rows = sizes[t]
        h_t, c_t = _variant_step(
            steps[t], h[:rows], c[:rows], w_hh, w_hr, peepholes, coupled_gates, layer_norm,
            keeps[t],
        )
        outputs[t] = h_t
        if rows < batch:
            # Rows past this step's batch keep their state, as in lstm_layer.
            h_t, c_t = torch.cat([h_t, h[rows:]]), torch.cat([c_t, c[rows:]])
        h, c = h_t, c_t
    output = torch.stack(outputs) if batch_sizes is None else torch.cat(outputs)
    return output, h, c
