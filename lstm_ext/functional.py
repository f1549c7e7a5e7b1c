"""Functional LSTM and GRU on lstm_ext's fused operators: layers x directions, dropout between
layers.

:func:`lstm` takes the arguments of ``torch._VF.lstm`` (what ``torch.nn.LSTM.forward`` calls),
and :func:`lstm_cell` those of ``torch._VF.lstm_cell``; :func:`gru` and :func:`gru_cell` those of
``torch._VF.gru`` and ``torch._VF.gru_cell``; so the modules are thin. They answer the mistakes
that the ATen RNN checks catch with ATen's exception types and messages.

Shapes: ``T`` time, ``N`` batch, ``C`` input size, ``H`` hidden size, ``P`` projection size
(``P = H`` without projections), ``L`` layers, ``D`` directions; ``rows`` the rows of a packed
batch (the sum of its batch_sizes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

from lstm_ext import onnx as lstm_onnx
from lstm_ext import ops, variants

__all__ = ["autocast_cast", "autocast_dtype", "gru", "gru_cell", "lstm", "lstm_cell"]

# How ATen names dtypes in its messages ("mat1 and mat2 must have the same dtype, but got Double
# and Float").
_ATEN_DTYPE_NAMES = {
    torch.float64: "Double",
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def _aten_dtype_name(dtype: torch.dtype) -> str:
    return _ATEN_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_matmul_dtype(lhs: Tensor, weight: Tensor) -> None:
    """The error torch.nn.LSTM's GEMM raises when a state's dtype differs from the weights'."""
    if lhs.dtype != weight.dtype:
        raise RuntimeError(
            "mat1 and mat2 must have the same dtype, but got "
            f"{_aten_dtype_name(lhs.dtype)} and {_aten_dtype_name(weight.dtype)}"
        )


# How ATen's mm (a GEMM without bias) names dtypes: their C++ type names ("expected m1 and m2 to
# have the same dtype, but got: double != float").
_ATEN_CPP_TYPE_NAMES = {
    torch.float64: "double",
    torch.float32: "float",
    torch.float16: "c10::Half",
    torch.bfloat16: "c10::BFloat16",
    torch.int64: "long int",
    torch.int32: "int",
    torch.int16: "short int",
    torch.int8: "signed char",
    torch.uint8: "unsigned char",
    torch.bool: "bool",
}


def _check_gemm_dtype(lhs: Tensor, weight: Tensor, has_bias: bool) -> None:
    """The error torch's GRU GEMMs raise for a dtype mismatch: addmm's with a bias, mm's without."""
    if lhs.dtype == weight.dtype:
        return
    if has_bias:
        _check_matmul_dtype(lhs, weight)
    names = [_ATEN_CPP_TYPE_NAMES.get(t.dtype, str(t.dtype)) for t in (lhs, weight)]
    raise RuntimeError(
        f"expected m1 and m2 to have the same dtype, but got: {names[0]} != {names[1]}"
    )


def autocast_dtype(
    device: torch.device, packed: bool = False, projections: bool = False, cell: bool = False
) -> torch.dtype | None:
    """The dtype torch.nn.LSTM (or LSTMCell, with cell) computes in under torch.autocast.

    None when autocast leaves it alone. Measured on torch 2.13: on CUDA, cuDNN's autocast wrapper
    casts every RNN call, padded or packed, and ``lstm_cell`` is on the lower-precision list. On
    the CPU, oneDNN's LSTM layer is on that list and runs padded input without projections; with
    projections torch's native path runs, whose GEMMs (``linear``) autocast, so its outputs come
    out in the lower precision too (its cell state excepted, see lstm_ext.LSTM); packed input
    without projections and LSTMCell run in their own dtype.
    """
    kind = device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return None
    if kind == "cpu" and (cell or (packed and not projections)):
        return None
    return torch.get_autocast_dtype(kind)


def autocast_cast(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Casts as autocast casts an op's arguments: floating-point tensors, float64 excepted."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _forward_mode_active(*tensors: Tensor | None) -> bool:
    """Whether forward-mode AD reaches this call: torch.func.jvp (jacfwd, hessian), or
    torch.autograd.forward_ad dual tensors among `tensors`.

    It matters because a raw op without a forward formula does not fail there: its outputs carry
    no tangent, which torch.func.jvp returns as zeros. So the LSTM takes its autograd Functions
    (which have jvp) whenever forward mode is active, whether or not a gradient is needed.
    """
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active() and any(
        interpreter.key() == torch._C._functorch.TransformType.Jvp
        for interpreter in torch._C._functorch.get_interpreter_stack()
    ):
        return True
    return forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    )


def lstm(
    input: Tensor,
    hx: Sequence[Tensor],
    weights: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    batch_sizes: Tensor | None = None,
    variant: variants.LstmVariant | None = None,
    variant_weights: Sequence[dict[str, Tensor]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A stacked, optionally bidirectional LSTM running the fused ``lstm_ext::lstm_forward`` op.

    Args:
        input: ``[T, N, C]``, or ``[N, T, C]`` if batch_first; with batch_sizes, a packed batch
            ``[rows, C]`` (a ``PackedSequence``'s data; batch_first is then ignored).
        hx: (h0 ``[L*D, N, P]``, c0 ``[L*D, N, H]``).
        weights: ``torch.nn.LSTM``'s flat weight list (``_flat_weights``): per layer, per
            direction, w_ih ``[4H, C_l]``, w_hh ``[4H, P]``, then b_ih, b_hh ``[4H]`` if
            has_biases, then w_hr ``[P, H]`` for an LSTM with projections (which the length of
            the list tells).
        dropout: probability of zeroing each output of every layer but the last, when train.
        batch_sizes: a ``PackedSequence``'s batch_sizes ``[T]`` (int64, CPU), or None.
        variant: an LSTM variant (lstm_ext.variants), with variant_weights its parameters per
            layer and direction (by name prefix: ``peephole``, ``layer_norm_weight_ih``, ...).
            With coupled gates the weights and biases have 3H rows.

    Returns:
        (output ``[T, N, D*P]`` or ``[N, T, D*P]``, packed: ``[rows, D*P]``; h_n ``[L*D, N, P]``;
        c_n ``[L*D, N, H]``), the final states taken at each sequence's own last step.
    """
    if variant is not None and not variant.changes_forward:
        variant = None
    extra_tensors = [t for extras in variant_weights or () for t in extras.values()]
    if variant is not None and lstm_onnx.in_onnx_export():
        lstm_onnx.check_variant_exportable(variant, "LSTM", train)
    if len(hx) != 2:
        raise RuntimeError("lstm expects two hidden states")
    h0, c0 = hx
    directions = 2 if bidirectional else 1
    per_cell = 4 if has_biases else 2
    cells = num_layers * directions
    if len(weights) == cells * (per_cell + 1):
        per_cell += 1  # w_hr: an LSTM with projections
    elif len(weights) != cells * per_cell:
        raise ValueError(
            f"lstm_ext.functional.lstm: expected {cells * per_cell} weight tensors (or "
            f"{cells * (per_cell + 1)} with projections) for num_layers={num_layers}, "
            f"bidirectional={bidirectional}, has_biases={has_biases}, got {len(weights)}"
        )
    projected = per_cell in (3, 5)
    # ATen's checks, in ATen's order.
    for state in (h0, c0):
        if state.device != input.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {state.device}"
            )
    for weight in weights:
        if weight.device != input.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{input.device} and parameter tensor at {weight.device}"
            )
    _check_matmul_dtype(h0, weights[1])
    _check_matmul_dtype(c0, weights[1])
    if batch_sizes is None:
        x = input.transpose(0, 1) if batch_first else input
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    else:
        x = input

    training = _needs_grad(input, h0, c0, *weights, *extra_tensors) or _forward_mode_active(
        input, h0, c0, *weights, *extra_tensors
    )
    # torch.onnx.export: lstm_ext.onnx's stand-in writes each layer as an ONNX LSTM node (an
    # export computes no gradients, so no autograd Function is traced).
    exporting = lstm_onnx.in_onnx_export()
    layer_input = x
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            w = weights[index * per_cell : (index + 1) * per_cell]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            w_hr = w[-1] if projected else None
            if exporting and lstm_onnx.unrolls_variant(variant):
                # Layer norm, zoneout: the reference's plain ops, unrolled over T.
                out, h, c = lstm_onnx.unrolled_variant_layer(
                    variant, variant_weights[index], layer_input, h0[index], c0[index], w[0],
                    w[1], b_ih, b_hh, w_hr, batch_sizes, reverse=direction == 1,
                )
            elif exporting:
                # Peepholes, coupled gates: the ONNX LSTM node's own P input and input_forget.
                variant_options = {}
                if variant is not None:
                    variant_options = dict(peephole=variant_weights[index].get("peephole"),
                                           coupled_gates=variant.coupled_gates)
                out, h, c, _, _, _ = lstm_onnx.lstm_forward(
                    layer_input, h0[index], c0[index], w[0], w[1], b_ih, b_hh,
                    reverse=direction == 1, training=False, w_hr=w_hr, batch_sizes=batch_sizes,
                    **variant_options,
                )
            elif variant is not None:
                out, h, c = variants.run_variant_layer(
                    variant, variant_weights[index], layer_input, h0[index], c0[index], w[0],
                    w[1], b_ih, b_hh, w_hr, batch_sizes, direction == 1, train, training,
                )
            elif training:
                out, h, c, _, _, _ = ops.apply_lstm_layer(
                    layer_input, h0[index], c0[index], w[0], w[1], b_ih, b_hh, w_hr, batch_sizes,
                    direction == 1,
                )
            else:
                with _below_autograd():
                    out, h, c, _, _, _ = ops.lstm_forward(
                        layer_input, h0[index], c0[index], w[0], w[1], b_ih, b_hh,
                        reverse=direction == 1, training=False, w_hr=w_hr,
                        batch_sizes=batch_sizes,
                    )
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    output = layer_input.transpose(0, 1) if batch_first and batch_sizes is None else layer_input
    return output, _stack(h_n), _stack(c_n)


def _stack(states: list[Tensor]) -> Tensor:
    """torch.stack of the layers' final states; one layer's (a fresh op output) as a view of it,
    which saves a copy and a few microseconds per call (felt at T = 1)."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


def _below_autograd() -> contextlib.AbstractContextManager:
    """For a raw op call that autograd does not record (no input requires grad, no forward mode):
    skips the autograd dispatch key, whose Python kernel (torch.library.register_autograd) would
    only find that and redispatch, ~9 us per call. Not while compiling or under torch.func's
    transforms, which handle the keys themselves."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def lstm_cell(
    input: Tensor,
    hx: Sequence[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    variant: variants.LstmVariant | None = None,
    variant_weights: dict[str, Tensor] | None = None,
    train: bool = False,
) -> tuple[Tensor, Tensor]:
    """One LSTM step on the fused ``lstm_ext::lstm_cell_forward`` op.

    Args:
        input: ``[N, C]``. hx: (h ``[N, H]``, c ``[N, H]``). w_ih ``[4H, C]``, w_hh ``[4H, H]``,
            b_ih/b_hh ``[4H]`` or None.
        variant, variant_weights: an LSTM variant and its parameters (see :func:`lstm`); the
            step then runs as a one-step layer of it. train: the module's training mode, which
            zoneout follows.

    Returns:
        (h' ``[N, H]``, c' ``[N, H]``).
    """
    if len(hx) != 2:
        raise RuntimeError("lstm_cell expects two hidden states")
    h, c = hx
    # ATen's check_rnn_cell_forward_input / _hidden, then its GEMM's dtype check.
    if input.size(1) != w_ih.size(1):
        raise RuntimeError(
            f"input has inconsistent input_size: got {input.size(1)} expected {w_ih.size(1)}"
        )
    hidden_size = w_hh.size(1)
    for label, state in enumerate((h, c)):
        if input.size(0) != state.size(0):
            raise RuntimeError(
                f"Input batch size {input.size(0)} doesn't match hidden{label} batch size "
                f"{state.size(0)}"
            )
        if state.size(1) != hidden_size:
            raise RuntimeError(
                f"hidden{label} has inconsistent hidden_size: got {state.size(1)}, "
                f"expected {hidden_size}"
            )
    _check_matmul_dtype(input, w_ih)
    _check_matmul_dtype(h, w_hh)
    _check_matmul_dtype(c, w_hh)
    for tensor in (h, c, w_ih, w_hh, b_ih, b_hh):
        if tensor is not None and tensor.device != input.device:
            # ATen names the device its kernel runs on (the other tensor's) first.
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{tensor.device} and {input.device}!"
            )
    exporting = lstm_onnx.in_onnx_export()
    if variant is not None and variant.changes_forward and exporting:
        lstm_onnx.check_variant_exportable(variant, "LSTMCell", train)
        if lstm_onnx.unrolls_variant(variant):
            # Layer norm, zoneout: the reference's plain ops for the one step.
            _, h_new, c_new = lstm_onnx.unrolled_variant_layer(
                variant, variant_weights or {}, input.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh,
            )
            return h_new, c_new
        # Peepholes and coupled gates are the ONNX LSTM node's own.
        h_new, c_new, _ = lstm_onnx.lstm_cell_forward(
            input, h, c, w_ih, w_hh, b_ih, b_hh, False,
            peephole=(variant_weights or {}).get("peephole"),
            coupled_gates=variant.coupled_gates,
        )
    elif variant is not None and variant.changes_forward:
        extras = list((variant_weights or {}).values())
        tensors = (input, h, c, w_ih, w_hh, b_ih, b_hh, *extras)
        _, h_new, c_new = variants.run_variant_layer(
            variant, variant_weights or {}, input.unsqueeze(0), h, c, w_ih, w_hh, b_ih, b_hh,
            None, None, False, train, _needs_grad(*tensors) or _forward_mode_active(*tensors),
        )
    elif exporting:
        # torch.onnx.export: lstm_ext.onnx's stand-in writes the step as an ONNX LSTM node.
        h_new, c_new, _ = lstm_onnx.lstm_cell_forward(input, h, c, w_ih, w_hh, b_ih, b_hh, False)
    elif _needs_grad(input, h, c, w_ih, w_hh, b_ih, b_hh) or _forward_mode_active(
        input, h, c, w_ih, w_hh, b_ih, b_hh
    ):
        h_new, c_new, _ = ops.apply_lstm_cell(input, h, c, w_ih, w_hh, b_ih, b_hh)
    else:
        with _below_autograd():
            h_new, c_new, _ = ops.lstm_cell_forward(input, h, c, w_ih, w_hh, b_ih, b_hh, False)
    return h_new, c_new


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
    """A stacked, optionally bidirectional GRU running the fused ``lstm_ext::gru_forward`` op.

    Args:
        input: ``[T, N, C]``, or ``[N, T, C]`` if batch_first; with batch_sizes, a packed batch
            ``[rows, C]`` (a ``PackedSequence``'s data; batch_first is then ignored).
        hx: h0 ``[L*D, N, H]``.
        weights: ``torch.nn.GRU``'s flat weight list (``_flat_weights``): per layer, per
            direction, w_ih ``[3H, C_l]``, w_hh ``[3H, H]``, then b_ih, b_hh ``[3H]`` if
            has_biases. The gates are torch's (r, z, n).
        dropout: probability of zeroing each output of every layer but the last, when train.
        batch_sizes: a ``PackedSequence``'s batch_sizes ``[T]`` (int64, CPU), or None.

    Returns:
        (output ``[T, N, D*H]`` or ``[N, T, D*H]``, packed: ``[rows, D*H]``; h_n ``[L*D, N, H]``),
        the final states taken at each sequence's own last step.
    """
    directions = 2 if bidirectional else 1
    per_cell = 4 if has_biases else 2
    cells = num_layers * directions
    if len(weights) != cells * per_cell:
        raise RuntimeError(
            f"got an incorrect number of RNN parameters: expected {cells * per_cell} weight "
            f"tensors for num_layers={num_layers}, bidirectional={bidirectional}, "
            f"has_biases={has_biases}, got {len(weights)}"
        )
    # ATen's checks, in ATen's order: devices, then the first layer's input GEMM (over the whole
    # sequence), the sequence length, the first step's hidden GEMM.
    h0 = hx
    if h0.device != input.device:
        raise RuntimeError(
            "Input and hidden tensors are not at the same device, found input tensor at "
            f"{input.device} and hidden tensor at {h0.device}"
        )
    for weight in weights:
        if weight.device != input.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor at "
                f"{input.device} and parameter tensor at {weight.device}"
            )
    if h0.size(0) != cells:
        raise RuntimeError("Expected more hidden states in stacked_rnn")
    _check_gemm_dtype(input, weights[0], has_biases)
    if batch_sizes is None:
        x = input.transpose(0, 1) if batch_first else input
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    else:
        x = input
    _check_gemm_dtype(h0, weights[1], has_biases)

    training = _needs_grad(input, h0, *weights) or _forward_mode_active(input, h0, *weights)
    exporting = lstm_onnx.in_onnx_export()
    layer_input = x
    h_n = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            w = weights[index * per_cell : (index + 1) * per_cell]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            if exporting:
                # torch.onnx.export: lstm_ext.onnx's stand-in writes the layer as an ONNX GRU.
                out, h, _, _ = lstm_onnx.gru_forward(
                    layer_input, h0[index], w[0], w[1], b_ih, b_hh, reverse=direction == 1,
                    batch_sizes=batch_sizes,
                )
            elif training:
                out, h, _, _ = ops.apply_gru_layer(
                    layer_input, h0[index], w[0], w[1], b_ih, b_hh, batch_sizes, direction == 1
                )
            else:
                with _below_autograd():
                    out, h, _, _ = ops.gru_forward(
                        layer_input, h0[index], w[0], w[1], b_ih, b_hh,
                        reverse=direction == 1, training=False, batch_sizes=batch_sizes,
                    )
            outputs.append(out)
            h_n.append(h)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    output = layer_input.transpose(0, 1) if batch_first and batch_sizes is None else layer_input
    return output, _stack(h_n)


def gru_cell(
    input: Tensor,
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """One GRU step on the fused ``lstm_ext::gru_cell_forward`` op.

    Args:
        input: ``[N, C]``. hx: ``[N, H]``. w_ih ``[3H, C]``, w_hh ``[3H, H]``, b_ih/b_hh ``[3H]``
            or None.

    Returns:
        h' ``[N, H]``.
    """
    # ATen's check_rnn_cell_forward_input / _hidden, then its GEMMs' dtype checks.
    if input.size(1) != w_ih.size(1):
        raise RuntimeError(
            f"input has inconsistent input_size: got {input.size(1)} expected {w_ih.size(1)}"
        )
    if input.size(0) != hx.size(0):
        raise RuntimeError(
            f"Input batch size {input.size(0)} doesn't match hidden0 batch size {hx.size(0)}"
        )
    if hx.size(1) != w_hh.size(1):
        raise RuntimeError(
            f"hidden0 has inconsistent hidden_size: got {hx.size(1)}, expected {w_hh.size(1)}"
        )
    has_bias = b_ih is not None
    _check_gemm_dtype(input, w_ih, has_bias)
    _check_gemm_dtype(hx, w_hh, has_bias)
    for tensor in (hx, w_ih, w_hh, b_ih, b_hh):
        if tensor is not None and tensor.device != input.device:
            # As lstm_cell: torch's message depends on the device pair and the kernel that
            # notices; this one names both devices.
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices, "
                f"{tensor.device} and {input.device}!"
            )
    if lstm_onnx.in_onnx_export():
        h_new, _, _ = lstm_onnx.gru_cell_forward(input, hx, w_ih, w_hh, b_ih, b_hh)
    elif _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh) or _forward_mode_active(
        input, hx, w_ih, w_hh, b_ih, b_hh
    ):
        h_new, _, _ = ops.apply_gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)
    else:
        with _below_autograd():
            h_new, _, _ = ops.gru_cell_forward(input, hx, w_ih, w_hh, b_ih, b_hh, False)
    return h_new
