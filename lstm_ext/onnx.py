"""ONNX export of ``lstm_ext.LSTM`` / ``LSTMCell`` as ONNX's own ``LSTM`` operator, and of
``lstm_ext.GRU`` / ``GRUCell`` as ONNX's ``GRU`` (``linear_before_reset=1``, torch's form).

``torch.onnx.export(model, args, f)`` works as it does for ``torch.nn.LSTM``, with either exporter:

- The dynamo exporter (``dynamo=True``, the default): while ``torch.onnx.export`` traces the model,
  :mod:`lstm_ext.functional` calls the stand-ins :func:`lstm_forward` and
  :func:`lstm_cell_forward` below instead of the fused operators. They emit each layer and
  direction as one standard ONNX ``LSTM`` node through :func:`torch.onnx.ops.symbolic_multi_out`,
  torch's public way for Python code to place an ONNX operator in the exported graph, so no
  ``custom_translation_table`` is needed and no ``lstm_ext`` node reaches the ONNX file.
- A program that already holds the ``torch.ops.lstm_ext`` operators (an ``ExportedProgram`` made
  with ``torch.export.export``, which runs the fused operators) needs their translations:
  ``torch.onnx.export(program, f=..., custom_translation_table=custom_translation_table())``.
- The TorchScript exporter (``dynamo=False``): ``import lstm_ext`` registers a symbolic function
  for each forward operator with :func:`torch.onnx.register_custom_op_symbolic`.

Every path writes the same graph: per layer and direction one ``LSTM`` node (``direction`` forward
or reverse) whose weights are torch's with the gate blocks reordered from torch's (i, f, g, o) to
ONNX's (i, o, f, c), and ``B = [b_ih, b_hh]``; the cell is an ``LSTM`` node over one time step.
The GRU's likewise, one ``GRU`` node each, gates (r, z, n) reordered to ONNX's (z, r, h).
ONNX's ``LSTM`` has no projection and a ``PackedSequence`` does not survive tracing, so an LSTM
with ``proj_size > 0`` and packed input raise a ``RuntimeError`` that names the feature.

Of the LSTM variants, peepholes and coupled gates are ONNX's own: ``peephole=True`` becomes the
node's ``P`` input (ONNX's rows i, o, f from ours i, f, o) and ``coupled_gates=True`` its
``input_forget=1`` (f = 1 - i), with zero forget rows in ``W``, ``R`` and ``B``, which ONNX's
shapes require and ``input_forget`` ignores. ``forget_bias`` only initializes, so it exports as
the plain LSTM. ONNX Runtime computes these nodes as lstm_ext does; OpenVINO's ONNX frontend
(2026.4.1, measured) ignores P and ``input_forget`` and runs the plain LSTM. ONNX's ``LSTM`` has
no layer normalization and no zoneout: a layer with either exports as the plain ops of
:func:`lstm_ext.reference.lstm_variant_layer` (MatMul, LayerNormalization, Sigmoid, ...), its time
loop unrolled over the exported sequence length, which must then be static; zoneout exports its
eval form (the expectation), so a module in training mode with zoneout raises. For a program that
holds the operators, :func:`custom_translation_table` writes the same recurrence out step by step
(``lstm_layernorm_forward``, and ``lstm_variant_forward`` with zoneout).

onnx, onnxscript and onnxruntime are optional: nothing here imports them until an export runs.

``torch.onnx.export(..., verify=True)`` compares the ONNX model with the exported program run in
PyTorch, where ``torch.onnx.ops.symbolic_multi_out`` computes zeros (it only marks the ONNX node),
so its difference warnings mean nothing here: compare with the eager module instead.

Shapes: ``T`` time, ``N`` batch, ``C`` input size, ``H`` hidden size, ``D`` directions (1 per ONNX
node here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lstm_ext import ops, reference

try:
    # Part of torch (no onnx/onnxscript import): the dynamo exporter's "exporting" flag.
    from torch.onnx._internal.exporter import _flags as _exporter_flags
except ImportError:
    _exporter_flags = None

__all__ = [
    "check_packed_input",
    "check_variant_exportable",
    "custom_translation_table",
    "gru_cell_forward",
    "gru_forward",
    "in_onnx_export",
    "lstm_cell_forward",
    "lstm_forward",
    "unrolled_variant_layer",
    "unrolls_variant",
]

# An onnx_ir.Value while the dynamo exporter traces a translation, a torch._C.Value in the
# TorchScript exporter. The dynamo exporter reads the translations' annotations at run time
# (typing.get_type_hints): Any makes a parameter an input of any type (absent if its default is
# None), bool an attribute.
_Value = Any

_PROJECTIONS_ERROR = (
    "lstm_ext ONNX export: proj_size > 0 (LSTM with projections) has no ONNX LSTM equivalent "
    "(ONNX's LSTM has no projection weights); export an LSTM with proj_size=0."
)
_ZONEOUT_MASKS_ERROR = (
    "lstm_ext ONNX export: zoneout's training masks (random draws) cannot be exported; export "
    "the module in eval mode, where zoneout is its expectation."
)
_PACKED_ERROR = (
    "lstm_ext ONNX export: PackedSequence input cannot be exported (the packing does not "
    "survive tracing); pass the padded tensor [T, N, C] (or [N, T, C] with batch_first) instead."
)


def check_packed_input() -> None:
    """Raises the packed-input error during torch.onnx.export; does nothing otherwise.

    ``lstm_ext.LSTM`` calls it first thing for a ``PackedSequence``: the dynamo exporter's trace
    would otherwise stop earlier, at the data-dependent ``batch_sizes``, with a less clear error.
    """
    if in_onnx_export():
        raise RuntimeError(_PACKED_ERROR)


def check_variant_exportable(variant: Any, module: str, train: bool) -> None:
    """Raises, for ``lstm_ext.<module>`` with zoneout in training mode, the RuntimeError that
    says so: its random masks have no place in an exported graph (export the eval module)."""
    if train and variant.zoneout > 0:
        raise RuntimeError(
            f"lstm_ext ONNX export: lstm_ext.{module}({variant.extra_repr()}) is in training "
            "mode, where zoneout draws random masks; call .eval() before exporting (the export "
            "then computes zoneout's expectation)."
        )


def unrolls_variant(variant: Any) -> bool:
    """Whether a variant exports as plain ops, unrolled (layer norm, zoneout: ONNX's ``LSTM``
    has neither) rather than as an ONNX ``LSTM`` node."""
    return variant is not None and (variant.layer_norm or variant.zoneout > 0)


def unrolled_variant_layer(
    variant: Any, extras: dict[str, Tensor], input: Tensor, h0: Tensor, c0: Tensor,
    w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    w_hr: Tensor | None = None, batch_sizes: Tensor | None = None, reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer of a layer-norm or zoneout variant as torch.onnx.export traces it: the
    reference's plain ops in eval form, the time loop unrolled (input ``[T, N, C]``, T static).

    The exported graph's sequence length is the traced one: asked for a dynamic T, the dynamo
    exporter specializes it (the graph's input then declares it, and ONNX Runtime rejects another
    length); the TorchScript exporter fails on ``dynamic_axes`` that name T.

    Raises:
        RuntimeError: for projections or packed input, as for the plain LSTM.
    """
    _check_exportable(w_hr, batch_sizes)
    layer_norm = None
    if variant.layer_norm:
        prefix = "layer_norm_"
        layer_norm = {name[len(prefix):]: t for name, t in extras.items()
                      if name.startswith(prefix)}
    return reference.lstm_variant_layer(
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse=reverse, peephole=extras.get("peephole"),
        coupled_gates=variant.coupled_gates, layer_norm=layer_norm, zoneout=variant.zoneout,
        training=False,
    )


def _check_exportable(w_hr: Any, batch_sizes: Any) -> None:
    if w_hr is not None:
        raise RuntimeError(_PROJECTIONS_ERROR)
    if batch_sizes is not None:
        raise RuntimeError(_PACKED_ERROR)


def _dynamo_exporter_flag() -> bool:
    # When torch.export's non-strict trace fails (as it does on the RuntimeErrors above), the
    # dynamo exporter retries in strict mode, where Dynamo folds torch.onnx.is_in_onnx_export() to
    # False: the retry would then trace the fused operators and fail to translate them, and the
    # user would see that failure instead of ours. The exporter's own flag (private, hence the
    # default) keeps the retry on the export path, so it fails the same way and torch.onnx.export
    # reports the first error: ours.
    return bool(getattr(_exporter_flags, "_is_onnx_exporting", False))


def in_onnx_export() -> bool:
    """Whether torch.onnx.export (either exporter) is tracing the model."""
    # Either exporter traces (torch.jit's tracer, or torch.export, strict or not): outside a trace
    # the answer is no, without torch.onnx.is_in_onnx_export()'s two imports per call (2 us, on
    # every forward of a small eager model).
    tracing = torch.jit.is_tracing() or torch.compiler.is_exporting()
    if not (tracing or torch.compiler.is_compiling()):
        return False
    return torch.onnx.is_in_onnx_export() or _dynamo_exporter_flag()


def _traced_by_dynamo_exporter() -> bool:
    # Both exporters set in_onnx_export(); only the dynamo exporter traces through torch.export,
    # which is_exporting() tells. The TorchScript exporter traces the fused operators themselves
    # and translates them with the symbolics registered below.
    return in_onnx_export() and torch.compiler.is_exporting()


# ----------------------------------------------------------------------------------------------
# The stand-ins functional.py calls during torch.onnx.export.


# ONNX's gate k is torch's gate _ONNX_GATE_BLOCKS[k]: (i, o, f, c) from (i, f, g, o).
_ONNX_GATE_BLOCKS = (0, 3, 1, 2)
# The GRU's: ONNX's (z, r, h) from torch's (r, z, n).
_ONNX_GRU_GATE_BLOCKS = (1, 0, 2)


def _onnx_gate_order(tensor: Tensor, blocks: tuple[int, ...] = _ONNX_GATE_BLOCKS) -> Tensor:
    """torch's gate blocks along dim 0 in ONNX's order: LSTM (i, f, g, o) -> (i, o, f, c)
    ``[4H, ...]``; with _ONNX_GRU_GATE_BLOCKS, GRU (r, z, n) -> (z, r, h) ``[3H, ...]``."""
    # Slices, not chunk(): the exporter's optimizer folds Slice on weights into new initializers,
    # and leaves Split (what chunk() becomes) in the graph.
    hidden = tensor.shape[0] // len(blocks)
    return torch.cat([tensor[k * hidden : (k + 1) * hidden] for k in blocks])


def _onnx_lstm_rows(tensor: Tensor, coupled_gates: bool) -> Tensor:
    """Gate rows ``[4H, ...]`` (i, f, g, o), or with coupled gates ``[3H, ...]`` (i, g, o), as
    ONNX's ``[4H, ...]`` (i, o, f, c); the coupled forget rows, which ONNX's shapes require and
    its ``input_forget=1`` ignores, are zeros."""
    if not coupled_gates:
        return _onnx_gate_order(tensor)
    hidden = tensor.shape[0] // 3
    i, g, o = (tensor[k * hidden : (k + 1) * hidden] for k in range(3))
    return torch.cat([i, o, torch.zeros_like(i), g])


def _onnx_peephole(peephole: Tensor) -> Tensor:
    """Our peephole rows ``[3, H]`` (w_ci, w_cf, w_co) as ONNX's P ``[1, 3H]`` (i, o, f)."""
    return torch.cat([peephole[0], peephole[2], peephole[1]]).unsqueeze(0)


def _symbolic_lstm(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    reverse: bool,
    peephole: Tensor | None = None,
    coupled_gates: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One ONNX ``LSTM`` node: x ``[T, N, C]``, h0/c0 ``[N, H]`` -> (Y ``[T, 1, N, H]``,
    Y_h ``[1, N, H]``, Y_c ``[1, N, H]``); peephole ``[3, H]`` and coupled_gates as
    :func:`lstm_ext.ops.lstm_variant_forward` takes them."""
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[1]
    weights = [_onnx_lstm_rows(w, coupled_gates).unsqueeze(0) for w in (w_ih, w_hh)]
    bias = None
    if b_ih is not None and b_hh is not None:
        bias = torch.cat([_onnx_lstm_rows(b, coupled_gates) for b in (b_ih, b_hh)]).unsqueeze(0)
    attributes = {"hidden_size": hidden, "direction": "reverse" if reverse else "forward"}
    if coupled_gates:
        attributes["input_forget"] = 1
    # Inputs X, W, R, B, sequence_lens (absent: every sequence runs all T steps), initial_h,
    # initial_c, P.
    inputs = [x, *weights, bias, None, h0.unsqueeze(0), c0.unsqueeze(0)]
    if peephole is not None:
        inputs.append(_onnx_peephole(peephole))
    y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        inputs,
        attributes,
        dtypes=[x.dtype] * 3,
        shapes=[[steps, 1, batch, hidden], [1, batch, hidden], [1, batch, hidden]],
    )
    return y, y_h, y_c


def lstm_forward(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    reverse: bool = False,
    training: bool = False,
    w_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None,
    peephole: Tensor | None = None,
    coupled_gates: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`lstm_ext.ops.lstm_forward` as torch.onnx.export traces it, or with ``peephole``
    (``[3, H]``) or ``coupled_gates`` :func:`lstm_ext.ops.lstm_variant_forward`.

    Same arguments and results (input ``[T, N, C]``, h0/c0 ``[N, H]`` -> output ``[T, N, H]``,
    h_n, c_n ``[N, H]``, and three saved tensors, here always empty: an export computes no
    gradients). Under the dynamo exporter the layer becomes one ONNX ``LSTM`` node; under the
    TorchScript exporter the fused operator runs and its registered symbolic translates it.

    Raises:
        RuntimeError: for ``w_hr`` (projections) or ``batch_sizes`` (packed input), which ONNX's
            ``LSTM`` cannot express.
    """
    _check_exportable(w_hr, batch_sizes)
    variant = peephole is not None or coupled_gates
    if not _traced_by_dynamo_exporter():
        if variant:
            return ops.lstm_variant_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole,
                                            coupled_gates, reverse, training)
        return ops.lstm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training)
    y, y_h, y_c = _symbolic_lstm(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, peephole,
                                 coupled_gates)
    empty = input.new_empty(0)
    return y.squeeze(1), y_h.squeeze(0), y_c.squeeze(0), empty, empty, empty


def lstm_cell_forward(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    training: bool = False,
    peephole: Tensor | None = None,
    coupled_gates: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lstm_ext.ops.lstm_cell_forward` as torch.onnx.export traces it (with ``peephole``
    or ``coupled_gates``, a one-step :func:`lstm_ext.ops.lstm_variant_forward`).

    input ``[N, C]``, hx/cx ``[N, H]`` -> (h ``[N, H]``, c ``[N, H]``, an empty saved tensor).
    Under the dynamo exporter the step is an ONNX ``LSTM`` node over a sequence of length 1.
    """
    if not _traced_by_dynamo_exporter():
        if peephole is not None or coupled_gates:
            _, h, c, *_ = ops.lstm_variant_forward(input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih,
                                                   b_hh, peephole, coupled_gates)
            return h, c, input.new_empty(0)
        return ops.lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, training)
    _, y_h, y_c = _symbolic_lstm(input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh, False,
                                 peephole, coupled_gates)
    return y_h.squeeze(0), y_c.squeeze(0), input.new_empty(0)


def _symbolic_gru(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, reverse: bool,
) -> tuple[Tensor, Tensor]:
    """One ONNX ``GRU`` node: x ``[T, N, C]``, h0 ``[N, H]`` -> (Y ``[T, 1, N, H]``, Y_h
    ``[1, N, H]``). ``linear_before_reset=1`` is torch's form, r multiplying W_hn h + b_hn."""
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[1]
    blocks = _ONNX_GRU_GATE_BLOCKS
    weights = [_onnx_gate_order(w, blocks).unsqueeze(0) for w in (w_ih, w_hh)]
    bias = None
    if b_ih is not None and b_hh is not None:
        bias = torch.cat([_onnx_gate_order(b_ih, blocks), _onnx_gate_order(b_hh, blocks)])
        bias = bias.unsqueeze(0)
    # Inputs X, W, R, B, sequence_lens (absent), initial_h.
    y, y_h = torch.onnx.ops.symbolic_multi_out(
        "GRU",
        [x, *weights, bias, None, h0.unsqueeze(0)],
        {"hidden_size": hidden, "direction": "reverse" if reverse else "forward",
         "linear_before_reset": 1},
        dtypes=[x.dtype] * 2,
        shapes=[[steps, 1, batch, hidden], [1, batch, hidden]],
    )
    return y, y_h


def gru_forward(
    input: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    reverse: bool = False,
    training: bool = False,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`lstm_ext.ops.gru_forward` as torch.onnx.export traces it: under the dynamo exporter
    one ONNX ``GRU`` node; under the TorchScript exporter the fused operator, which its registered
    symbolic translates. The saved tensors come out empty.

    Raises:
        RuntimeError: for ``batch_sizes`` (packed input).
    """
    _check_exportable(None, batch_sizes)
    if not _traced_by_dynamo_exporter():
        return ops.gru_forward(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, training)
    y, y_h = _symbolic_gru(input, h0, w_ih, w_hh, b_ih, b_hh, reverse)
    empty = input.new_empty(0)
    return y.squeeze(1), y_h.squeeze(0), empty, empty


def gru_cell_forward(
    input: Tensor,
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    training: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lstm_ext.ops.gru_cell_forward` as torch.onnx.export traces it: a ``GRU`` node over
    one time step."""
    if not _traced_by_dynamo_exporter():
        return ops.gru_cell_forward(input, hx, w_ih, w_hh, b_ih, b_hh, training)
    _, y_h = _symbolic_gru(input.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh, False)
    empty = input.new_empty(0)
    return y_h.squeeze(0), empty, empty


# ----------------------------------------------------------------------------------------------
# Dynamo exporter: translations of the torch.ops.lstm_ext operators, for programs that hold them.


# With coupled gates: ONNX's (i, o, f, c) from our (i, g, o), None a block of zeros (the forget
# rows that ONNX's shapes require and input_forget=1 ignores).
_ONNX_COUPLED_GATE_BLOCKS = (0, 2, None, 1)


def _translated_weights(
    op: Any, w_ih: _Value, w_hh: _Value, b_ih: _Value, b_hh: _Value, gate_blocks: tuple
) -> tuple[list[_Value], _Value]:
    """W, R and B of an ONNX LSTM or GRU node, gate blocks reordered, with onnxscript's ``op``."""
    hidden = int(w_hh.shape[1])
    axis0 = op.Constant(value_ints=[0])

    def gate_order(value: _Value) -> _Value:
        blocks = [
            op.Slice(
                value,
                op.Constant(value_ints=[k * hidden]),
                op.Constant(value_ints=[(k + 1) * hidden]),
                axis0,
            )
            for k in (0 if k is None else k for k in gate_blocks)
        ]
        blocks = [
            op.CastLike(op.ConstantOfShape(op.Shape(block)), block) if k is None else block
            for k, block in zip(gate_blocks, blocks)
        ]
        return op.Concat(*blocks, axis=0)

    weights = [op.Unsqueeze(gate_order(w), axis0) for w in (w_ih, w_hh)]
    bias = None
    if b_ih is not None and b_hh is not None:
        bias = op.Unsqueeze(op.Concat(gate_order(b_ih), gate_order(b_hh), axis=0), axis0)
    return weights, bias


def _translated_lstm(
    op: Any,
    input: _Value,
    h0: _Value,
    c0: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value,
    b_hh: _Value,
    reverse: bool,
    peephole: _Value = None,
    coupled_gates: bool = False,
) -> tuple[_Value, _Value, _Value]:
    """The ONNX ``LSTM`` node of :func:`_symbolic_lstm`, written with onnxscript's ``op``."""
    axis0 = op.Constant(value_ints=[0])
    blocks = _ONNX_COUPLED_GATE_BLOCKS if coupled_gates else _ONNX_GATE_BLOCKS
    weights, bias = _translated_weights(op, w_ih, w_hh, b_ih, b_hh, blocks)
    extra_inputs, attributes = [], {}
    if peephole is not None:
        # Our rows (i, f, o) as ONNX's P [1, 3H] (i, o, f).
        order = op.Constant(value_ints=[0, 2, 1])
        extra_inputs.append(op.Reshape(op.Gather(peephole, order, axis=0),
                                       op.Constant(value_ints=[1, -1])))
    if coupled_gates:
        attributes["input_forget"] = 1
    return op.LSTM(
        input,
        *weights,
        bias,
        None,
        op.Unsqueeze(h0, axis0),
        op.Unsqueeze(c0, axis0),
        *extra_inputs,
        hidden_size=int(w_hh.shape[1]),
        direction="reverse" if reverse else "forward",
        **attributes,
    )


def _translated_gru(
    op: Any, input: _Value, h0: _Value, w_ih: _Value, w_hh: _Value, b_ih: _Value,
    b_hh: _Value, reverse: bool,
) -> tuple[_Value, _Value]:
    """The ONNX ``GRU`` node of :func:`_symbolic_gru`, written with onnxscript's ``op``."""
    axis0 = op.Constant(value_ints=[0])
    weights, bias = _translated_weights(op, w_ih, w_hh, b_ih, b_hh, _ONNX_GRU_GATE_BLOCKS)
    return op.GRU(
        input, *weights, bias, None, op.Unsqueeze(h0, axis0), hidden_size=int(w_hh.shape[1]),
        direction="reverse" if reverse else "forward", linear_before_reset=1,
    )


def _empty_like(op: Any, value: _Value) -> _Value:
    """A ``[0]`` tensor of value's dtype: a saved tensor, which no exported graph reads."""
    return op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[0])), value)


def _translate_lstm_forward(
    input: _Value,
    h0: _Value,
    c0: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value = None,
    b_hh: _Value = None,
    reverse: bool = False,
    training: bool = False,
    w_hr: _Value = None,
    batch_sizes: _Value = None,
) -> tuple[_Value, ...]:
    """ONNX for ``lstm_ext::lstm_forward``; the saved tensors come out empty whatever training."""
    from onnxscript import opset18 as op

    _check_exportable(w_hr, batch_sizes)
    y, y_h, y_c = _translated_lstm(op, input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
    axis0, axis1 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    empty = _empty_like(op, input)
    return op.Squeeze(y, axis1), op.Squeeze(y_h, axis0), op.Squeeze(y_c, axis0), empty, empty, empty


def _translate_lstm_variant_forward(
    input: _Value,
    h0: _Value,
    c0: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value = None,
    b_hh: _Value = None,
    peephole: _Value = None,
    coupled_gates: bool = False,
    reverse: bool = False,
    training: bool = False,
    w_hr: _Value = None,
    batch_sizes: _Value = None,
    zoneout_h: _Value = None,
    zoneout_c: _Value = None,
    zoneout: float = 0.0,
) -> tuple[_Value, ...]:
    """ONNX for ``lstm_ext::lstm_variant_forward``: peepholes and coupled gates as an ONNX
    ``LSTM`` node; with zoneout (eval form) the recurrence written out step by step."""
    from onnxscript import opset18 as op

    _check_exportable(w_hr, batch_sizes)
    if zoneout_h is not None or zoneout_c is not None:
        raise RuntimeError(_ZONEOUT_MASKS_ERROR)
    if zoneout > 0:
        # ONNX's LSTM has no zoneout: the input's share in one MatMul, then the steps.
        input_part = op.MatMul(input, op.Transpose(w_ih, perm=[1, 0]))
        if b_ih is not None and b_hh is not None:
            input_part = op.Add(input_part, op.Add(b_ih, b_hh))
        steps = _static_steps(input, "lstm_ext::lstm_variant_forward with zoneout")
        y, h, c = _translated_unrolled_recurrence(
            op, input_part, steps, h0, c0, w_hh, peephole, coupled_gates, None, zoneout, reverse,
        )
        empty = _empty_like(op, input)
        return y, h, c, empty, empty, empty
    y, y_h, y_c = _translated_lstm(op, input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, peephole,
                                   coupled_gates)
    axis0, axis1 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    empty = _empty_like(op, input)
    return op.Squeeze(y, axis1), op.Squeeze(y_h, axis0), op.Squeeze(y_c, axis0), empty, empty, empty


def _static_steps(input: _Value, what: str) -> int:
    """The sequence length of ``input [T, ...]`` as an int, for a time loop written out step by
    step; a symbolic one raises."""
    steps = input.shape[0] if input.shape is not None else None
    if not isinstance(steps, int):
        raise RuntimeError(
            f"lstm_ext ONNX export: {what} exports its time loop unrolled (ONNX's LSTM has no "
            "layer normalization or zoneout), so the sequence length must be static; export the "
            "program without a dynamic T."
        )
    return steps


def _normalized(outputs: Any) -> _Value:
    """LayerNormalization's first output, Y (onnxscript returns all three: Y, mean, 1/std)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def _translated_unrolled_recurrence(
    op: Any, input_part: _Value, steps: int, h0: _Value, c0: _Value, w_hh: _Value,
    peephole: _Value, coupled_gates: bool, layer_norm: tuple[_Value, _Value, _Value] | None,
    zoneout: float, reverse: bool,
) -> tuple[_Value, _Value, _Value]:
    """The recurrence of :func:`lstm_ext.reference.lstm_variant_layer` (its ``_variant_step``,
    eval form) from the input's share of the pre-activations ``[T, N, G*H]``, written out step by
    step with onnxscript's ``op``: (Y ``[T, N, H]``, h_n, c_n ``[N, H]``). layer_norm: (the gain
    of the normalization of h W_hh^T, the gain and bias of c's)."""
    hidden = int(w_hh.shape[1])
    gates = 3 if coupled_gates else 4
    axis0, axis1 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    w_hh_t = op.Transpose(w_hh, perm=[1, 0])

    def block(value: _Value, k: int) -> _Value:
        return op.Slice(value, op.Constant(value_ints=[k * hidden]),
                        op.Constant(value_ints=[(k + 1) * hidden]), axis1)

    def row(value: _Value, k: int) -> _Value:
        return op.Gather(value, op.Constant(value_int=k), axis=0)

    w_ci, w_cf, w_co = (row(peephole, k) for k in range(3)) if peephole is not None else (None,) * 3
    one = op.CastLike(op.Constant(value_float=1.0), h0)
    h, c, outputs = h0, c0, [None] * steps
    for t in reversed(range(steps)) if reverse else range(steps):
        hidden_part = op.MatMul(h, w_hh_t)
        if layer_norm is not None:
            hidden_part = _normalized(op.LayerNormalization(hidden_part, layer_norm[0], axis=-1,
                                                            epsilon=reference.LAYER_NORM_EPS))
        pre = op.Add(row(input_part, t), hidden_part)
        i, g, o = block(pre, 0), block(pre, gates - 2), block(pre, gates - 1)
        if w_ci is not None:
            i = op.Add(i, op.Mul(w_ci, c))
        i = op.Sigmoid(i)
        if coupled_gates:
            forget = op.Sub(one, i)
        else:
            f = block(pre, 1)
            forget = op.Sigmoid(op.Add(f, op.Mul(w_cf, c)) if w_cf is not None else f)
        c_new = op.Add(op.Mul(forget, c), op.Mul(i, op.Tanh(g)))
        if w_co is not None:
            o = op.Add(o, op.Mul(w_co, c_new))
        c_out = c_new
        if layer_norm is not None:
            c_out = _normalized(op.LayerNormalization(c_new, layer_norm[1], layer_norm[2],
                                                      axis=-1, epsilon=reference.LAYER_NORM_EPS))
        h_new = op.Mul(op.Sigmoid(o), op.Tanh(c_out))
        if zoneout > 0:
            keep = op.CastLike(op.Constant(value_float=zoneout), h0)
            h_new = op.Add(op.Mul(keep, h), op.Mul(op.Sub(one, keep), h_new))
            c_new = op.Add(op.Mul(keep, c), op.Mul(op.Sub(one, keep), c_new))
        h, c = h_new, c_new
        outputs[t] = op.Unsqueeze(h, axis0)
    return op.Concat(*outputs, axis=0), h, c


def _translate_lstm_layernorm_forward(
    input_part: _Value,
    h0: _Value,
    c0: _Value,
    w_hh: _Value,
    weight_hh: _Value,
    weight_c: _Value,
    bias_c: _Value,
    peephole: _Value = None,
    coupled_gates: bool = False,
    reverse: bool = False,
    training: bool = False,
    batch_sizes: _Value = None,
    zoneout_h: _Value = None,
    zoneout_c: _Value = None,
    zoneout: float = 0.0,
) -> tuple[_Value, ...]:
    """ONNX for ``lstm_ext::lstm_layernorm_forward``: its recurrence written out step by step
    (ONNX's LSTM has no layer normalization), zoneout in eval form; the saved tensors empty."""
    from onnxscript import opset18 as op

    _check_exportable(None, batch_sizes)
    if zoneout_h is not None or zoneout_c is not None:
        raise RuntimeError(_ZONEOUT_MASKS_ERROR)
    steps = _static_steps(input_part, "lstm_ext::lstm_layernorm_forward")
    y, h, c = _translated_unrolled_recurrence(
        op, input_part, steps, h0, c0, w_hh, peephole, coupled_gates,
        (weight_hh, weight_c, bias_c), zoneout, reverse,
    )
    empty = _empty_like(op, input_part)
    return y, h, c, empty, empty, empty, empty, empty, empty


def _translate_lstm_cell_forward(
    input: _Value,
    hx: _Value,
    cx: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value = None,
    b_hh: _Value = None,
    training: bool = False,
) -> tuple[_Value, _Value, _Value]:
    """ONNX for ``lstm_ext::lstm_cell_forward``: an ``LSTM`` node over one time step."""
    from onnxscript import opset18 as op

    axis0 = op.Constant(value_ints=[0])
    x = op.Unsqueeze(input, axis0)
    _, y_h, y_c = _translated_lstm(op, x, hx, cx, w_ih, w_hh, b_ih, b_hh, False)
    return op.Squeeze(y_h, axis0), op.Squeeze(y_c, axis0), _empty_like(op, input)


def _translate_gru_forward(
    input: _Value,
    h0: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value = None,
    b_hh: _Value = None,
    reverse: bool = False,
    training: bool = False,
    batch_sizes: _Value = None,
) -> tuple[_Value, ...]:
    """ONNX for ``lstm_ext::gru_forward``; the saved tensors come out empty whatever training."""
    from onnxscript import opset18 as op

    _check_exportable(None, batch_sizes)
    y, y_h = _translated_gru(op, input, h0, w_ih, w_hh, b_ih, b_hh, reverse)
    axis0, axis1 = op.Constant(value_ints=[0]), op.Constant(value_ints=[1])
    empty = _empty_like(op, input)
    return op.Squeeze(y, axis1), op.Squeeze(y_h, axis0), empty, empty


def _translate_gru_cell_forward(
    input: _Value,
    hx: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value = None,
    b_hh: _Value = None,
    training: bool = False,
) -> tuple[_Value, _Value, _Value]:
    """ONNX for ``lstm_ext::gru_cell_forward``: a ``GRU`` node over one time step."""
    from onnxscript import opset18 as op

    axis0 = op.Constant(value_ints=[0])
    _, y_h = _translated_gru(op, op.Unsqueeze(input, axis0), hx, w_ih, w_hh, b_ih, b_hh, False)
    empty = _empty_like(op, input)
    return op.Squeeze(y_h, axis0), empty, empty


def custom_translation_table() -> dict[Callable, Callable]:
    """Translations of lstm_ext's forward operators for the dynamo exporter.

    ``torch.onnx.export`` of a model needs none of this (the model's export path emits ONNX
    ``LSTM`` nodes itself). Pass it when the exported program already contains the
    ``torch.ops.lstm_ext`` operators, e.g. one made with ``torch.export.export``::

        program = torch.export.export(model.eval(), (x,))
        torch.onnx.export(program, f="model.onnx",
                          custom_translation_table=lstm_ext.onnx.custom_translation_table())

    Returns:
        ``{torch.ops.lstm_ext.lstm_forward.default: ..., ...lstm_cell_forward.default: ...,
        ...lstm_variant_forward.default: ..., ...lstm_layernorm_forward.default: ...,
        ...gru_forward.default: ...,
        ...gru_cell_forward.default: ...}``, the values
        onnxscript-traced functions (onnxscript must be installed when the export runs).
    """
    return {
        torch.ops.lstm_ext.lstm_forward.default: _translate_lstm_forward,
        torch.ops.lstm_ext.lstm_cell_forward.default: _translate_lstm_cell_forward,
        torch.ops.lstm_ext.lstm_variant_forward.default: _translate_lstm_variant_forward,
        torch.ops.lstm_ext.lstm_layernorm_forward.default: _translate_lstm_layernorm_forward,
        torch.ops.lstm_ext.gru_forward.default: _translate_gru_forward,
        torch.ops.lstm_ext.gru_cell_forward.default: _translate_gru_cell_forward,
    }


# ----------------------------------------------------------------------------------------------
# TorchScript exporter: symbolic functions of the forward operators.


def _ts_absent(g: Any) -> _Value:
    """An omitted optional input of an ONNX node."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


def _ts_is_none(value: _Value) -> bool:
    return value is None or value.node().mustBeNone()


def _ts_constant(value: _Value) -> bool:
    node = value.node()
    # A traced bool argument arrives as a prim::Constant, or as the onnx::Constant (a one-element
    # tensor) the exporter has already turned it into.
    if node.kind() not in ("prim::Constant", "onnx::Constant"):
        raise RuntimeError(
            "lstm_ext ONNX export: the operators' bool arguments (reverse, coupled_gates) must be "
            "constants"
        )
    # node.i("value") for a prim::Constant, node.t("value") for an onnx::Constant.
    return bool(getattr(node, node.kindOf("value"))("value"))


def _ts_axes(g: Any, op_type: str, value: _Value, axis: int) -> _Value:
    # Squeeze and Unsqueeze take their axes as an input from opset 13, as an attribute before.
    if g.opset >= 13:
        return g.op(op_type, value, g.op("Constant", value_t=torch.tensor([axis])))
    return g.op(op_type, value, axes_i=[axis])


def _ts_rnn(
    g: Any,
    input: _Value,
    states: list[_Value],
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value,
    b_hh: _Value,
    reverse: bool,
    gru: bool = False,
    peephole: _Value = None,
    coupled_gates: bool = False,
) -> tuple[_Value, ...]:
    """The ONNX ``LSTM`` node of :func:`_symbolic_lstm` (states [h0, c0]; peephole and
    coupled_gates as there), or with `gru` the ``GRU`` node of :func:`_symbolic_gru` (states
    [h0]), in a TorchScript graph."""
    sizes = w_hh.type().sizes() if w_hh.type().isSubtypeOf(torch._C.TensorType.get()) else None
    name = "GRU" if gru else "LSTM"
    if not sizes:
        raise RuntimeError(
            f"lstm_ext ONNX export: the shape of w_hh [{'3H' if gru else '4H'}, H] must be known "
            f"to export the {name}"
        )
    hidden = sizes[1]
    gate_blocks = (_ONNX_GRU_GATE_BLOCKS if gru
                   else _ONNX_COUPLED_GATE_BLOCKS if coupled_gates else _ONNX_GATE_BLOCKS)
    # With coupled gates the forget slot gathers the i rows, then a 0/1 row mask zeroes it.
    blocks = [torch.arange(k * hidden, (k + 1) * hidden) for k in (k or 0 for k in gate_blocks)]
    order = g.op("Constant", value_t=torch.cat(blocks))
    keep = None
    if None in gate_blocks:
        dtype = w_hh.type().dtype()
        mask = torch.cat([torch.full((hidden,), float(k is not None), dtype=dtype)
                          for k in gate_blocks])
        keep = g.op("Constant", value_t=mask)

    def gate_order(value: _Value) -> _Value:
        rows = g.op("Gather", value, order, axis_i=0)
        if keep is None:
            return rows
        rank = value.type().dim()
        mask = keep if rank == 1 else _ts_axes(g, "Unsqueeze", keep, 1)
        return g.op("Mul", rows, mask)

    weights = [_ts_axes(g, "Unsqueeze", gate_order(w), 0) for w in (w_ih, w_hh)]
    bias = _ts_absent(g)
    if not _ts_is_none(b_ih) and not _ts_is_none(b_hh):
        bias = _ts_axes(
            g, "Unsqueeze", g.op("Concat", gate_order(b_ih), gate_order(b_hh), axis_i=0), 0
        )
    attributes = {"linear_before_reset_i": 1} if gru else {}
    extra_inputs = []
    if not _ts_is_none(peephole):
        # Our rows (i, f, o) as ONNX's P [1, 3H] (i, o, f).
        rows = g.op("Gather", peephole, g.op("Constant", value_t=torch.tensor([0, 2, 1])),
                    axis_i=0)
        extra_inputs.append(
            g.op("Reshape", rows, g.op("Constant", value_t=torch.tensor([1, 3 * hidden]))))
    if coupled_gates:
        attributes["input_forget_i"] = 1
    return g.op(
        name,
        input,
        *weights,
        bias,
        _ts_absent(g),
        *[_ts_axes(g, "Unsqueeze", state, 0) for state in states],
        *extra_inputs,
        hidden_size_i=hidden,
        direction_s="reverse" if reverse else "forward",
        outputs=2 if gru else 3,
        **attributes,
    )


def _ts_empty(g: Any) -> _Value:
    return g.op("Constant", value_t=torch.empty(0))


def _symbolic_lstm_forward(
    g: Any,
    input: _Value,
    h0: _Value,
    c0: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value,
    b_hh: _Value,
    reverse: _Value,
    training: _Value,
    w_hr: _Value = None,
    batch_sizes: _Value = None,
) -> tuple[_Value, ...]:
    _check_exportable(
        None if _ts_is_none(w_hr) else w_hr, None if _ts_is_none(batch_sizes) else batch_sizes
    )
    y, y_h, y_c = _ts_rnn(g, input, [h0, c0], w_ih, w_hh, b_ih, b_hh, _ts_constant(reverse))
    return (
        _ts_axes(g, "Squeeze", y, 1),
        _ts_axes(g, "Squeeze", y_h, 0),
        _ts_axes(g, "Squeeze", y_c, 0),
        _ts_empty(g),
        _ts_empty(g),
        _ts_empty(g),
    )


def _symbolic_lstm_variant_forward(
    g: Any,
    input: _Value,
    h0: _Value,
    c0: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value,
    b_hh: _Value,
    peephole: _Value,
    coupled_gates: _Value,
    reverse: _Value,
    training: _Value,
    w_hr: _Value = None,
    batch_sizes: _Value = None,
    zoneout_h: _Value = None,
    zoneout_c: _Value = None,
    zoneout: _Value = None,
) -> tuple[_Value, ...]:
    _check_exportable(
        None if _ts_is_none(w_hr) else w_hr, None if _ts_is_none(batch_sizes) else batch_sizes
    )
    # functional.py refuses zoneout before the op is traced; an op called directly with masks
    # still gets the error.
    if not (_ts_is_none(zoneout_h) and _ts_is_none(zoneout_c)):
        raise RuntimeError("lstm_ext ONNX export: zoneout has no ONNX LSTM equivalent")
    y, y_h, y_c = _ts_rnn(g, input, [h0, c0], w_ih, w_hh, b_ih, b_hh, _ts_constant(reverse),
                          peephole=peephole, coupled_gates=_ts_constant(coupled_gates))
    return (
        _ts_axes(g, "Squeeze", y, 1),
        _ts_axes(g, "Squeeze", y_h, 0),
        _ts_axes(g, "Squeeze", y_c, 0),
        _ts_empty(g),
        _ts_empty(g),
        _ts_empty(g),
    )


def _symbolic_lstm_cell_forward(
    g: Any,
    input: _Value,
    hx: _Value,
    cx: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value,
    b_hh: _Value,
    training: _Value,
) -> tuple[_Value, _Value, _Value]:
    x = _ts_axes(g, "Unsqueeze", input, 0)
    _, y_h, y_c = _ts_rnn(g, x, [hx, cx], w_ih, w_hh, b_ih, b_hh, False)
    return _ts_axes(g, "Squeeze", y_h, 0), _ts_axes(g, "Squeeze", y_c, 0), _ts_empty(g)


def _symbolic_gru_forward(
    g: Any,
    input: _Value,
    h0: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value,
    b_hh: _Value,
    reverse: _Value,
    training: _Value,
    batch_sizes: _Value = None,
) -> tuple[_Value, ...]:
    _check_exportable(None, None if _ts_is_none(batch_sizes) else batch_sizes)
    y, y_h = _ts_rnn(g, input, [h0], w_ih, w_hh, b_ih, b_hh, _ts_constant(reverse), gru=True)
    return (_ts_axes(g, "Squeeze", y, 1), _ts_axes(g, "Squeeze", y_h, 0), _ts_empty(g),
            _ts_empty(g))


def _symbolic_gru_cell_forward(
    g: Any,
    input: _Value,
    hx: _Value,
    w_ih: _Value,
    w_hh: _Value,
    b_ih: _Value,
    b_hh: _Value,
    training: _Value,
) -> tuple[_Value, _Value, _Value]:
    x = _ts_axes(g, "Unsqueeze", input, 0)
    _, y_h = _ts_rnn(g, x, [hx], w_ih, w_hh, b_ih, b_hh, False, gru=True)
    return _ts_axes(g, "Squeeze", y_h, 0), _ts_empty(g), _ts_empty(g)


def _register_torchscript_symbolics() -> None:
    # Opset 9 is the TorchScript exporter's base: the symbolics adapt to the target opset
    # (_ts_axes), and ONNX's LSTM is unchanged in what they use since opset 7.
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic("lstm_ext::lstm_forward", _symbolic_lstm_forward, 9)
    register_custom_op_symbolic("lstm_ext::lstm_cell_forward", _symbolic_lstm_cell_forward, 9)
    # ONNX's LSTM has had P and input_forget since opset 1.
    register_custom_op_symbolic("lstm_ext::lstm_variant_forward", _symbolic_lstm_variant_forward,
                                9)
    # ONNX's GRU has linear_before_reset (torch's form) from opset 3.
    register_custom_op_symbolic("lstm_ext::gru_forward", _symbolic_gru_forward, 9)
    register_custom_op_symbolic("lstm_ext::gru_cell_forward", _symbolic_gru_cell_forward, 9)


_register_torchscript_symbolics()
