"""Typed wrappers of the ``torch.ops.lstm_ext`` operators, their fake kernels and autograd formulas.

The C++ library registers the schemas and the device kernels. This module adds what makes the ops
first-class PyTorch citizens: a fake (meta) kernel for each, so ``torch.compile`` and
``torch.library.opcheck`` can trace them; autograd for each forward op, whose first order calls
the matching private backward op and whose higher orders (double backward) and forward mode
differentiate the reference math; the autograd Functions :class:`LstmLayerFunction` and
:class:`LstmCellFunction` that the functional layer applies, which torch.func's transforms accept;
and a vmap rule for each op.

Shapes: ``T`` time, ``N`` batch, ``C`` input size, ``H`` hidden size, ``P`` projection size
(``P = H`` without projections); ``rows`` the rows of a packed batch (the sum of its batch_sizes).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GruCellFunction",
    "GruLayerFunction",
    "LstmCellFunction",
    "LstmLayerFunction",
    "LstmLayerNormLayerFunction",
    "LstmVariantLayerFunction",
    "apply_gru_cell",
    "apply_gru_layer",
    "apply_lstm_cell",
    "apply_lstm_layer",
    "apply_lstm_layernorm_layer",
    "apply_lstm_variant_layer",
    "gru_cell_forward",
    "gru_forward",
    "lstm_cell_forward",
    "lstm_forward",
    "lstm_layernorm_forward",
    "lstm_variant_forward",
]


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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction over a whole sequence.

    Args:
        input: ``[T, N, C]``, or a packed batch ``[rows, C]`` when batch_sizes is given.
        h0: ``[N, P]``. c0: ``[N, H]``. w_ih: ``[4H, C]``. w_hh: ``[4H, P]``.
        b_ih, b_hh: ``[4H]`` or both None.
        reverse: run the recurrence from ``t = T-1`` down to 0 (a bidirectional layer's second
            direction); ``output[t]`` is still the hidden state at time ``t``.
        training: save what backward needs. A call made with ``training=False`` can still be
            differentiated: backward then recomputes it.
        w_hr: ``[P, H]`` projection weights (``torch.nn.LSTM(proj_size=P)``): each step's
            ``h_t = (o * tanh(c_t)) w_hr^T``, which the next step's recurrent GEMM reads.
        batch_sizes: ``[T]`` int64 on the CPU, a ``PackedSequence``'s: step ``t`` runs the first
            ``batch_sizes[t]`` sequences (sorted by decreasing length).

    Returns:
        ``(output, h_n [N, P], c_n [N, H], saved_gates, saved_cells, saved_hidden)``. output is
        ``[T, N, P]`` (packed: ``[rows, P]``); h_n and c_n are each sequence's state after its
        own last step. When training, saved_gates ``[T, N, 4H]``, saved_cells ``[T, N, H]`` and,
        with w_hr, saved_hidden ``[T, N, H]`` (packed: ``[rows, ...]``); empty otherwise.
    """
    return torch.ops.lstm_ext.lstm_forward.default(
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training, w_hr, batch_sizes
    )


def lstm_cell_forward(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    training: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM step, as ``torch.nn.LSTMCell``: input ``[N, C]``, hx/cx ``[N, H]``.

    Returns ``(h [N, H], c [N, H], saved_gates)``, the last ``[N, 4H]`` when training, else empty.
    """
    return torch.ops.lstm_ext.lstm_cell_forward.default(
        input, hx, cx, w_ih, w_hh, b_ih, b_hh, training
    )


# ----------------------------------------------------------------------------------------------
# Fake kernels: output metadata only, for tracing (torch.compile, opcheck, meta tensors). Every
# real output is freshly allocated and contiguous, whatever the strides of the inputs.


@torch.library.register_fake("lstm_ext::lstm_forward")
def _lstm_forward_fake(
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training, w_hr=None, batch_sizes=None
):
    hidden = w_hr.shape[1] if w_hr is not None else w_hh.shape[1]
    proj = w_hh.shape[1]
    steps = input.shape[:-1]  # (T, N), or (rows,) when packed
    batch = h0.shape[0]
    output = input.new_empty(*steps, proj)
    h_n = input.new_empty(batch, proj)
    c_n = input.new_empty(batch, hidden)
    if not training:
        return output, h_n, c_n, input.new_empty(0), input.new_empty(0), input.new_empty(0)
    saved_hidden = input.new_empty(*steps, hidden) if w_hr is not None else input.new_empty(0)
    return (
        output,
        h_n,
        c_n,
        input.new_empty(*steps, 4 * hidden),
        input.new_empty(*steps, hidden),
        saved_hidden,
    )


@torch.library.register_fake("lstm_ext::_lstm_backward")
def _lstm_backward_fake(
    grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, output, saved_gates, saved_cells,
    reverse, w_hr=None, batch_sizes=None, saved_hidden=None,
):
    grad_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty(0)
    return (
        input.new_empty(input.shape),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty(w_hh.shape[0]),
        grad_w_hr,
    )


@torch.library.register_fake("lstm_ext::lstm_cell_forward")
def _lstm_cell_forward_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh, training):
    batch = input.shape[0]
    hidden = w_hh.shape[1]
    saved_gates = input.new_empty(batch, 4 * hidden) if training else input.new_empty(0)
    return input.new_empty(batch, hidden), input.new_empty(batch, hidden), saved_gates


@torch.library.register_fake("lstm_ext::_lstm_cell_backward")
def _lstm_cell_backward_fake(grad_h, grad_c, input, hx, cx, w_ih, w_hh, c, saved_gates):
    return (
        input.new_empty(input.shape),
        hx.new_empty(hx.shape),
        cx.new_empty(cx.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty(w_hh.shape[0]),
    )


# ----------------------------------------------------------------------------------------------
# Autograd.
#
# First-order gradients always run the fused backward ops. That backward is itself differentiable
# (double backward: gradient penalties, MAML, Hessian-vector products): its own backward
# differentiates the same gradients written in the reference's plain PyTorch ops, which autograd
# and torch.func differentiate to any order. Only a graph that differentiates a gradient pays for
# the slower reference math; first-order calls run exactly as before.
#
# Forward mode (jvp: torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) has no fused
# kernel: the Functions' jvp computes the tangents from the reference math too.
#
# Two entry points share this machinery:
# - torch.library.register_autograd on the forward ops, for direct callers of torch.ops.lstm_ext
#   (and torch.library.opcheck);
# - the autograd.Function classes LstmLayerFunction and LstmCellFunction, which the functional
#   layer applies. Unlike the Function torch.library generates, they define setup_context and a
#   vmap rule, which torch.func's transforms (grad, vjp, jacrev, vmap) require.

_LayerInputs = tuple  # (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr); b_*, w_hr may be None
_CellInputs = tuple  # (input, hx, cx, w_ih, w_hh, b_ih, b_hh); b_* may be None


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


class _OnPresent:
    """``function(*arguments)`` as a function of arguments' non-None entries only.

    torch.func differentiates functions of tensors; the None arguments (a layer without biases or
    projections) are held fixed, and None outputs (their gradients) are dropped. After the first
    call, ``exists[k]`` tells whether function's output k was returned.
    """

    def __init__(self, function: Callable, arguments: tuple) -> None:
        self.function, self.arguments = function, arguments
        self.present = [k for k, value in enumerate(arguments) if value is not None]
        self.primals = tuple(arguments[k] for k in self.present)
        self.exists: list[bool] = []

    def __call__(self, *values: Tensor) -> tuple[Tensor, ...]:
        full = list(self.arguments)
        for k, value in zip(self.present, values):
            full[k] = value
        outputs = self.function(*full)
        self.exists = [out is not None for out in outputs]
        return tuple(out for out in outputs if out is not None)

    def per_argument(self, grads: tuple[Tensor, ...]) -> list[Tensor | None]:
        """Gradients of the present arguments, spread back to all of them (None for the rest)."""
        result: list[Tensor | None] = [None] * len(self.arguments)
        for k, grad in zip(self.present, grads):
            result[k] = grad
        return result

    def per_output(self, values: tuple[Tensor, ...]) -> list[Tensor | None]:
        """Values of the returned outputs, spread back to all of function's (None for the rest)."""
        remaining = iter(values)
        return [next(remaining) if keep else None for keep in self.exists]


def _vjp(function: Callable, arguments: tuple, cotangents: tuple) -> list[Tensor | None]:
    """The vector-Jacobian product of ``function(*arguments)`` with ``cotangents``.

    None arguments are held fixed and get None (see :class:`_OnPresent`); a None output takes no
    cotangent, a None cotangent counts as zero. Computed with torch.func.vjp rather than
    torch.autograd.grad: it nests both inside torch.func transforms and inside autograd, and its
    result is differentiable wherever its inputs are, so gradients compose to any order.
    """
    on_present = _OnPresent(function, arguments)
    outputs, vjp_fn = torch.func.vjp(on_present, *on_present.primals)
    kept = [ct for ct, keep in zip(cotangents, on_present.exists) if keep]
    filled = tuple(_zeros_if_none(ct, out) for ct, out in zip(kept, outputs))
    return on_present.per_argument(vjp_fn(filled))


def _jvp(function: Callable, arguments: tuple, tangents: tuple) -> list[Tensor | None]:
    """The Jacobian-vector product of ``function(*arguments)`` with ``tangents`` (forward mode).

    As :func:`_vjp`: None arguments are held fixed, a None tangent counts as zero, and a None
    output gets a None tangent. Computed as the transpose of the vector-Jacobian product
    (``u -> J^T u`` is linear; its own vjp with v is ``J v``), not with torch.func.jvp: forward
    mode cannot nest inside torch.autograd.forward_ad's dual level, from which this is called,
    while reverse mode nests anywhere.
    """
    on_present = _OnPresent(function, arguments)
    outputs, vjp_fn = torch.func.vjp(on_present, *on_present.primals)
    _, transposed_vjp = torch.func.vjp(
        lambda *u: vjp_fn(u), *(torch.zeros_like(out) for out in outputs)
    )
    filled = tuple(_zeros_if_none(tangents[k], arguments[k]) for k in on_present.present)
    return on_present.per_output(transposed_vjp(filled))


def _reference_layer(reverse: bool, batch_sizes: Tensor | None) -> Callable:
    """One layer in the reference's ops: a function of _LayerInputs giving (output, h_n, c_n)."""
    from lstm_ext import reference

    def layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return reference.lstm_layer(
            input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse=reverse, w_hr=w_hr,
            batch_sizes=batch_sizes,
        )

    return layer


def _reference_cell(input, hx, cx, w_ih, w_hh, b_ih, b_hh) -> tuple[Tensor, Tensor]:
    """One step in the reference's ops, a function of _CellInputs."""
    from lstm_ext import reference

    return reference.lstm_cell(input, (hx, cx), w_ih, w_hh, b_ih, b_hh)


def _reference_layer_gradients(
    reverse: bool, batch_sizes: Tensor | None, grad_output: Tensor, grad_h_n: Tensor,
    grad_c_n: Tensor, *inputs: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """What ``_lstm_backward`` returns for one layer, in the reference's differentiable ops.

    inputs: _LayerInputs. Returns (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh,
    grad_bias or None, grad_w_hr or None): one bias gradient, as the op's, serves b_ih and b_hh,
    which enter the gates as one sum.
    """
    layer = _reference_layer(reverse, batch_sizes)
    g = _vjp(layer, inputs, (grad_output, grad_h_n, grad_c_n))
    return g[0], g[1], g[2], g[3], g[4], g[5], g[7]


def _reference_cell_gradients(
    grad_h: Tensor, grad_c: Tensor, *inputs: Tensor | None
) -> tuple[Tensor | None, ...]:
    """What ``_lstm_cell_backward`` returns, in the reference's differentiable ops.

    inputs: _CellInputs. Returns (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias
    or None).
    """
    g = _vjp(_reference_cell, inputs, (grad_h, grad_c))
    return g[0], g[1], g[2], g[3], g[4], g[5]


def _save_for_both_modes(ctx: Any, *tensors: Tensor | None) -> None:
    """Saves tensors for backward (reverse mode) and for jvp (forward mode) alike.

    The same list for both: torch.func's generated vmap rule tracks the batch dimensions of one
    list of saved tensors per Function, so two different lists would be confused under vmap.
    """
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)


class _LstmLayerBackward(torch.autograd.Function):
    """``_lstm_backward`` as a differentiable function of the incoming gradients and the inputs.

    forward runs the fused op; backward (the double backward of the layer) differentiates
    :func:`_reference_layer_gradients`.
    Arguments: (grad_output, grad_h_n, grad_c_n, *_LayerInputs, batch_sizes, output, saved_gates,
    saved_cells, saved_hidden, reverse); returns the op's seven gradients.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
        batch_sizes, output, saved_gates, saved_cells, saved_hidden, reverse,
    ):
        return torch.ops.lstm_ext._lstm_backward.default(
            grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, output, saved_gates,
            saved_cells, reverse, w_hr, batch_sizes, saved_hidden if w_hr is not None else None,
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _save_for_both_modes(ctx, *inputs[:12])
        ctx.reverse = inputs[16]
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple:
        # Forward mode over the backward (torch.func.hessian is jacfwd(jacrev)).
        *arguments, batch_sizes = ctx.saved_tensors
        first_order = functools.partial(_reference_layer_gradients, ctx.reverse, batch_sizes)
        grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = _jvp(
            first_order, tuple(arguments), tangents[:11]
        )
        # The op returns a bias gradient and an empty grad_w_hr even without biases and w_hr;
        # their tangents must be tensors too (torch rejects None for a differentiable output).
        w_hh = arguments[7]
        if grad_bias is None:
            grad_bias = w_hh.new_zeros(w_hh.shape[0])
        if grad_w_hr is None:
            grad_w_hr = w_hh.new_zeros(0)
        return grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor | None) -> tuple:
        *arguments, batch_sizes = ctx.saved_tensors
        if all(ct is None for ct in cotangents):
            return (None,) * 17
        first_order = functools.partial(_reference_layer_gradients, ctx.reverse, batch_sizes)
        grads = _vjp(first_order, tuple(arguments), cotangents)
        return (*grads, None, None, None, None, None, None)


class _LstmCellBackward(torch.autograd.Function):
    """``_lstm_cell_backward`` as a differentiable function (see :class:`_LstmLayerBackward`).

    Arguments: (grad_h, grad_c, *_CellInputs, c, saved_gates); returns the op's six gradients.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, c, saved_gates):
        return torch.ops.lstm_ext._lstm_cell_backward.default(
            grad_h, grad_c, input, hx, cx, w_ih, w_hh, c, saved_gates
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _save_for_both_modes(ctx, *inputs[:9])
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple:
        *grads, grad_bias = _jvp(_reference_cell_gradients, tuple(ctx.saved_tensors), tangents[:9])
        if grad_bias is None:  # see _LstmLayerBackward.jvp
            w_hh = ctx.saved_tensors[6]
            grad_bias = w_hh.new_zeros(w_hh.shape[0])
        return (*grads, grad_bias)

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor | None) -> tuple:
        if all(ct is None for ct in cotangents):
            return (None,) * 11
        grads = _vjp(_reference_cell_gradients, tuple(ctx.saved_tensors), cotangents)
        return (*grads, None, None)


def _save_layer(
    ctx: Any, inputs: _LayerInputs, batch_sizes: Tensor | None, reverse: bool, output: tuple
) -> None:
    out, _h_n, _c_n, saved_gates, saved_cells, saved_hidden = output
    _save_for_both_modes(ctx, *inputs, batch_sizes, out, saved_gates, saved_cells, saved_hidden)
    ctx.reverse = reverse
    ctx.mark_non_differentiable(saved_gates, saved_cells, saved_hidden)
    # Otherwise autograd would allocate zero gradients for the saved buffers too ([T, N, 4H]).
    ctx.set_materialize_grads(False)


def _layer_gradients(
    ctx: Any, grad_output: Tensor | None, grad_h_n: Tensor | None, grad_c_n: Tensor | None
) -> tuple[Tensor | None, ...]:
    """The gradients of one layer for what :func:`_save_layer` saved: _LayerInputs' order, b_ih and
    b_hh each with the one bias gradient."""
    *inputs, batch_sizes, out, saved_gates, saved_cells, saved_hidden = ctx.saved_tensors
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs
    if saved_gates.numel() == 0 and out.numel() > 0:
        # Called with training=False (nothing saved) yet differentiated: recompute what backward
        # needs rather than fail. The functional layer passes training=True whenever a gradient
        # may be needed, so this path is rare.
        with torch.no_grad():
            out, _, _, saved_gates, saved_cells, saved_hidden = lstm_forward(
                input, h0, c0, w_ih, w_hh, b_ih, b_hh, ctx.reverse, True, w_hr, batch_sizes
            )
    arguments = (
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_h_n, h0),
        _zeros_if_none(grad_c_n, c0), *inputs, batch_sizes, out, saved_gates, saved_cells,
        saved_hidden, ctx.reverse,
    )
    # Only a backward that builds a graph (create_graph=True, or any torch.func transform, which
    # always does) needs the differentiable wrapper; a plain backward calls the op.
    if torch.is_grad_enabled():
        grads = _apply(_LstmLayerBackward, _CompiledLstmLayerBackward, *arguments)
    else:
        grads = _LstmLayerBackward.forward(*arguments)
    grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = grads
    grad_b = grad_bias if b_ih is not None else None
    grad_w_hr = grad_w_hr if w_hr is not None else None
    return grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b, grad_b, grad_w_hr


def _save_cell(ctx: Any, inputs: _CellInputs, output: tuple) -> None:
    _h, c, saved_gates = output
    _save_for_both_modes(ctx, *inputs, c, saved_gates)
    ctx.mark_non_differentiable(saved_gates)
    ctx.set_materialize_grads(False)


def _cell_gradients(
    ctx: Any, grad_h: Tensor | None, grad_c: Tensor | None
) -> tuple[Tensor | None, ...]:
    """The gradients of one step for what :func:`_save_cell` saved, in _CellInputs' order."""
    *inputs, c, saved_gates = ctx.saved_tensors
    input, hx, cx, w_ih, w_hh, b_ih, b_hh = inputs
    if saved_gates.numel() == 0 and c.numel() > 0:
        # Called with training=False: recompute the activations (see _layer_gradients).
        with torch.no_grad():
            _, c, saved_gates = lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, True)
    arguments = (_zeros_if_none(grad_h, hx), _zeros_if_none(grad_c, cx), *inputs, c, saved_gates)
    if torch.is_grad_enabled():
        grads = _apply(_LstmCellBackward, _CompiledLstmCellBackward, *arguments)
    else:
        grads = _LstmCellBackward.forward(*arguments)
    grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias = grads
    grad_b = grad_bias if b_ih is not None else None
    return grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b, grad_b


class LstmLayerFunction(torch.autograd.Function):
    """One layer in one direction (``lstm_forward`` with training=True) as an autograd.Function.

    ``LstmLayerFunction.apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes,
    reverse)`` returns ``lstm_forward``'s six outputs. Differentiable to any order, in reverse and
    forward mode; works under torch.func's grad, vjp, jacrev, jvp, jacfwd, hessian and vmap
    (through the ops' vmap rules). Under torch.compile, :func:`apply_lstm_layer` applies its
    jvp-less twin.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse):
        return lstm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, True, w_hr, batch_sizes)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        *layer_inputs, batch_sizes, reverse = inputs
        _save_layer(ctx, tuple(layer_inputs), batch_sizes, reverse, output)

    @staticmethod
    def backward(ctx: Any, grad_output, grad_h_n, grad_c_n, *_saved) -> tuple:
        return (*_layer_gradients(ctx, grad_output, grad_h_n, grad_c_n), None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple:
        # Forward mode (torch.func.jvp, jacfwd) through the reference math: the fused kernels have
        # no tangent pass. The saved buffers are not differentiable: no tangent.
        *inputs, batch_sizes = ctx.saved_tensors[:9]  # see _save_layer
        layer = _reference_layer(ctx.reverse, batch_sizes)
        out, h_n, c_n = _jvp(layer, tuple(inputs), tangents[:8])
        return out, h_n, c_n, None, None, None


class LstmCellFunction(torch.autograd.Function):
    """One step (``lstm_cell_forward`` with training=True) as an autograd.Function.

    ``LstmCellFunction.apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh)`` returns (h, c,
    saved_gates); see :class:`LstmLayerFunction`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        return lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _save_cell(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, grad_h, grad_c, *_saved) -> tuple:
        return _cell_gradients(ctx, grad_h, grad_c)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple:
        h, c = _jvp(_reference_cell, tuple(ctx.saved_tensors[:7]), tangents)  # see _save_cell
        return h, c, None


class _NoForwardMode:
    """Mixin: the Function without its jvp, for torch.compile.

    Dynamo refuses to trace an autograd.Function that defines jvp (and a compiled graph has no
    forward-mode AD anyway), so under torch.compile the Functions above run in this form.
    """

    jvp = staticmethod(torch.autograd.Function.jvp)


class _CompiledLstmLayerBackward(_NoForwardMode, _LstmLayerBackward):
    pass


class _CompiledLstmCellBackward(_NoForwardMode, _LstmCellBackward):
    pass


class _CompiledLstmLayerFunction(_NoForwardMode, LstmLayerFunction):
    pass


class _CompiledLstmCellFunction(_NoForwardMode, LstmCellFunction):
    pass


def _apply(
    function: type[torch.autograd.Function],
    compiled_twin: type[torch.autograd.Function],
    *args: Any,
) -> Any:
    """``function.apply(*args)``; under torch.compile its jvp-less twin's.

    Eagerly and outside torch.func transforms, without the signature binding Function.apply
    repeats on every call: it fills in default arguments with inspect.signature, tens of
    microseconds per layer (a tenth of a small LSTM's training step) and nothing to do here,
    where every argument is passed positionally. Otherwise the ordinary apply.
    """
    if torch.compiler.is_compiling():
        return compiled_twin.apply(*args)
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    args = torch._functorch.utils.unwrap_dead_wrappers(args)
    return super(torch.autograd.Function, function).apply(*args)


def apply_lstm_layer(
    input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, w_hr: Tensor | None, batch_sizes: Tensor | None, reverse: bool,
) -> tuple[Tensor, ...]:
    """:class:`LstmLayerFunction` applied (its jvp-less twin under torch.compile)."""
    return _apply(
        LstmLayerFunction, _CompiledLstmLayerFunction,
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
    )


def apply_lstm_cell(
    input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, ...]:
    """:class:`LstmCellFunction` applied (its jvp-less twin under torch.compile)."""
    return _apply(
        LstmCellFunction, _CompiledLstmCellFunction, input, hx, cx, w_ih, w_hh, b_ih, b_hh
    )


# The forward ops' own autograd (torch.library), for direct callers of torch.ops.lstm_ext.


def _lstm_forward_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, _training, *rest = inputs
    w_hr, batch_sizes = (list(rest) + [None, None])[:2]
    _save_layer(ctx, (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), batch_sizes, reverse, output)


def _lstm_forward_backward(ctx: Any, grad_output, grad_h_n, grad_c_n, *_saved) -> tuple:
    grads = _layer_gradients(ctx, grad_output, grad_h_n, grad_c_n)
    grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr = grads
    # In the op's argument order: ..., b_ih, b_hh, reverse, training, w_hr, batch_sizes.
    return (
        grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, None, None,
        grad_w_hr, None,
    )


def _lstm_cell_forward_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _save_cell(ctx, inputs[:7], output)


def _lstm_cell_forward_backward(ctx: Any, grad_h, grad_c, *_saved) -> tuple:
    return (*_cell_gradients(ctx, grad_h, grad_c), None)


def _no_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    pass


def _refuse_raw_backward_differentiation(op_name: str) -> Callable:
    def refuse(ctx: Any, *grads: Tensor) -> tuple:
        raise RuntimeError(
            f"lstm_ext: differentiating the private operator lstm_ext::{op_name} directly is not "
            "supported (its saved inputs are outputs of the forward op). Differentiate the "
            "forward instead: gradients of gradients through lstm_ext.LSTM / LSTMCell, "
            "lstm_ext.functional and torch.ops.lstm_ext.lstm_forward / lstm_cell_forward work "
            "to any order."
        )

    return refuse


torch.library.register_autograd(
    "lstm_ext::lstm_forward", _lstm_forward_backward, setup_context=_lstm_forward_setup_context
)
torch.library.register_autograd(
    "lstm_ext::lstm_cell_forward",
    _lstm_cell_forward_backward,
    setup_context=_lstm_cell_forward_setup_context,
)
torch.library.register_autograd(
    "lstm_ext::_lstm_backward",
    _refuse_raw_backward_differentiation("_lstm_backward"),
    setup_context=_no_context,
)
torch.library.register_autograd(
    "lstm_ext::_lstm_cell_backward",
    _refuse_raw_backward_differentiation("_lstm_cell_backward"),
    setup_context=_no_context,
)


# ----------------------------------------------------------------------------------------------
# vmap rules (torch.vmap, and through it torch.func.jacrev and per-sample gradients).
#
# A vmap over the batch of inputs and states with shared weights (the common case: a batch of
# batches, jacrev over the input, per-sample forward passes) folds the vmapped dimension into the
# op's batch dimension N: one fused call on [T, B*N, C]. Batched weights (an ensemble built with
# torch.func.stack_module_state), packed input, and every backward op (whose weight gradients sum
# over N, while vmap wants one per sample) run the op once per sample and stack the results.


def _with_defaults(args: tuple, in_dims: tuple, count: int) -> tuple[list, list]:
    # The dispatcher drops trailing arguments equal to their defaults (None).
    return list(args) + [None] * (count - len(args)), list(in_dims) + [None] * (count - len(args))


def _per_sample(op: Callable, batch_size: int, args: list, in_dims: list) -> tuple[tuple, tuple]:
    results = []
    for b in range(batch_size):
        sample = [a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]
        results.append(op(*sample))
    stacked = tuple(torch.stack(outputs) for outputs in zip(*results))
    return stacked, (0,) * len(stacked)


def _fold(t: Tensor, bdim: int | None, axis: int, batch_size: int) -> Tensor:
    """t's vmapped dimension (bdim; None: t is shared, so repeat it) merged into dimension axis."""
    if bdim is None:
        t = t.unsqueeze(axis).expand(*t.shape[:axis], batch_size, *t.shape[axis:])
    else:
        t = t.movedim(bdim, axis)
    return t.flatten(axis, axis + 1)


@torch.library.register_vmap("lstm_ext::lstm_forward")
def _lstm_forward_vmap(info, in_dims, *args):
    args, in_dims = _with_defaults(args, in_dims, 11)
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training, w_hr, batch_sizes = args
    weights_batched = any(in_dims[k] is not None for k in (3, 4, 5, 6, 9))
    if weights_batched or batch_sizes is not None:
        return _per_sample(torch.ops.lstm_ext.lstm_forward.default, info.batch_size, args, in_dims)
    batch = info.batch_size
    per_sample = h0.size(0) if in_dims[1] is None else h0.size(1 if in_dims[1] == 0 else 0)
    outputs = torch.ops.lstm_ext.lstm_forward.default(
        _fold(input, in_dims[0], 1, batch), _fold(h0, in_dims[1], 0, batch),
        _fold(c0, in_dims[2], 0, batch), w_ih, w_hh, b_ih, b_hh, reverse, training, w_hr, None,
    )
    out, h_n, c_n, saved_gates, saved_cells, saved_hidden = outputs
    split = (batch, per_sample)
    # [T, B*N, ...] -> [T, B, N, ...] and [B*N, ...] -> [B, N, ...]: views, no copies. The saved
    # tensors are empty ([0]) in inference: the same empty tensor for every sample.
    saved = [t.unflatten(1, split) if t.numel() else t for t in (saved_gates, saved_cells,
                                                                 saved_hidden)]
    result = (out.unflatten(1, split), h_n.unflatten(0, split), c_n.unflatten(0, split), *saved)
    dims = (1, 0, 0, *(1 if t.numel() else None for t in (saved_gates, saved_cells, saved_hidden)))
    return result, dims


@torch.library.register_vmap("lstm_ext::lstm_cell_forward")
def _lstm_cell_forward_vmap(info, in_dims, *args):
    args, in_dims = _with_defaults(args, in_dims, 8)
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, training = args
    if any(in_dims[k] is not None for k in (3, 4, 5, 6)):
        return _per_sample(
            torch.ops.lstm_ext.lstm_cell_forward.default, info.batch_size, args, in_dims
        )
    batch = info.batch_size
    per_sample = hx.size(0) if in_dims[1] is None else hx.size(1 if in_dims[1] == 0 else 0)
    h, c, saved_gates = torch.ops.lstm_ext.lstm_cell_forward.default(
        _fold(input, in_dims[0], 0, batch), _fold(hx, in_dims[1], 0, batch),
        _fold(cx, in_dims[2], 0, batch), w_ih, w_hh, b_ih, b_hh, training,
    )
    split = (batch, per_sample)
    gates = saved_gates.unflatten(0, split) if saved_gates.numel() else saved_gates
    return (h.unflatten(0, split), c.unflatten(0, split), gates), (
        0, 0, 0 if saved_gates.numel() else None
    )


@torch.library.register_vmap("lstm_ext::_lstm_backward")
def _lstm_backward_vmap(info, in_dims, *args):
    args, in_dims = _with_defaults(args, in_dims, 15)
    return _per_sample(torch.ops.lstm_ext._lstm_backward.default, info.batch_size, args, in_dims)


@torch.library.register_vmap("lstm_ext::_lstm_cell_backward")
def _lstm_cell_backward_vmap(info, in_dims, *args):
    return _per_sample(
        torch.ops.lstm_ext._lstm_cell_backward.default, info.batch_size, list(args), list(in_dims)
    )


# The other cells' ops (the GRU's, the LSTM variants'): one op call per vmapped sample, stacked.
# Correct for any in_dims (batched weights, packed input); a vmap over inputs alone does not fold
# into the batch as the LSTM's does.
def _register_per_sample_vmap(name: str) -> None:
    op = getattr(torch.ops.lstm_ext, name).default
    # The dispatcher drops trailing arguments equal to their defaults: put those back.
    defaults = [argument.default_value for argument in op._schema.arguments]

    def rule(info, in_dims, *args):
        given = len(args)
        args = list(args) + defaults[given:]
        in_dims = list(in_dims) + [None] * (len(defaults) - given)
        return _per_sample(op, info.batch_size, args, in_dims)

    torch.library.register_vmap(f"lstm_ext::{name}", rule)


for _name in ("gru_forward", "_gru_backward", "gru_cell_forward", "_gru_cell_backward",
              "lstm_variant_forward", "_lstm_variant_backward", "lstm_layernorm_forward",
              "_lstm_layernorm_backward"):
    _register_per_sample_vmap(_name)


# ----------------------------------------------------------------------------------------------
# The GRU's ops: wrappers, fake kernels and autograd. Their gradients run the fused backward ops;
# differentiated again, and in forward mode (jvp), they go through the reference's ops (see
# _differentiable_by_reference); under vmap they run once per sample (_register_per_sample_vmap).


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
    """One GRU layer in one direction over a whole sequence, as :func:`lstm_forward`.

    Args:
        input: ``[T, N, C]``, or a packed batch ``[rows, C]`` when batch_sizes is given.
        h0: ``[N, H]``. w_ih: ``[3H, C]``. w_hh: ``[3H, H]``. b_ih, b_hh: ``[3H]`` or both None.

    Returns:
        ``(output [T, N, H], h_n [N, H], saved_gates, saved_hidden_n)``; when training
        saved_gates ``[T, N, 3H]`` (activated r, z, n) and saved_hidden_n ``[T, N, H]``
        (``W_hn h_{t-1} + b_hn``), packed: ``[rows, ...]``; empty otherwise.
    """
    return torch.ops.lstm_ext.gru_forward.default(
        input, h0, w_ih, w_hh, b_ih, b_hh, reverse, training, batch_sizes
    )


def gru_cell_forward(
    input: Tensor,
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    training: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """One GRU step, as ``torch.nn.GRUCell``: input ``[N, C]``, hx ``[N, H]``.

    Returns ``(h [N, H], saved_gates [N, 3H], saved_hidden_n [N, H])``, the last two empty unless
    training.
    """
    return torch.ops.lstm_ext.gru_cell_forward.default(input, hx, w_ih, w_hh, b_ih, b_hh, training)


@torch.library.register_fake("lstm_ext::gru_forward")
def _gru_forward_fake(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, training, batch_sizes=None):
    hidden = w_hh.shape[1]
    steps = input.shape[:-1]  # (T, N), or (rows,) when packed
    output = input.new_empty(*steps, hidden)
    h_n = input.new_empty(h0.shape[0], hidden)
    if not training:
        return output, h_n, input.new_empty(0), input.new_empty(0)
    return output, h_n, input.new_empty(*steps, 3 * hidden), input.new_empty(*steps, hidden)


@torch.library.register_fake("lstm_ext::_gru_backward")
def _gru_backward_fake(
    grad_output, grad_h_n, input, h0, w_ih, w_hh, output, saved_gates, saved_hidden_n, reverse,
    batch_sizes=None,
):
    return (
        input.new_empty(input.shape),
        h0.new_empty(h0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty(w_hh.shape[0]),
        w_hh.new_empty(w_hh.shape[0]),
    )


@torch.library.register_fake("lstm_ext::gru_cell_forward")
def _gru_cell_forward_fake(input, hx, w_ih, w_hh, b_ih, b_hh, training):
    batch, hidden = input.shape[0], w_hh.shape[1]
    if not training:
        return input.new_empty(batch, hidden), input.new_empty(0), input.new_empty(0)
    return (
        input.new_empty(batch, hidden),
        input.new_empty(batch, 3 * hidden),
        input.new_empty(batch, hidden),
    )


@torch.library.register_fake("lstm_ext::_gru_cell_backward")
def _gru_cell_backward_fake(grad_h, input, hx, w_ih, w_hh, saved_gates, saved_hidden_n):
    return (
        input.new_empty(input.shape),
        hx.new_empty(hx.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty(w_hh.shape[0]),
        w_hh.new_empty(w_hh.shape[0]),
    )


class _GradientPair:
    """A layer's first-order gradients two ways, as functions of the same values (the incoming
    gradients, the layer's differentiable inputs, then what the forward saved besides): `fused`
    with the fused backward op (not differentiable), `reference` in the reference's plain ops,
    differentiable in the first `differentiable` values to any order. Both return the gradients
    of the layer's inputs, None for absent ones."""

    def __init__(self, fused: Callable, reference: Callable, differentiable: int) -> None:
        self.fused, self.reference, self.differentiable = fused, reference, differentiable

    def reference_of_differentiable(self, rest: tuple) -> Callable:
        return lambda *values: self.reference(*values, *rest)


class _DifferentiableGradients(torch.autograd.Function):
    """The fused first-order gradients as a function of (incoming gradients, inputs), whose own
    derivative is the reference's: double backward, gradient penalties and torch.func's nested
    transforms (grad of grad, jacfwd, hessian, vmap of grad) differentiate the GRU and the LSTM
    variants through it at the reference's speed, while the first order keeps the fused op's.
    ``apply(pair, *values)``. Every tensor comes in as a value (none is captured from another
    Function's ctx), so functorch sees each at its own level."""

    generate_vmap_rule = True

    @staticmethod
    def forward(pair: _GradientPair, *values: Tensor | None) -> tuple[Tensor | None, ...]:
        return tuple(pair.fused(*values))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        pair, *values = inputs
        ctx.pair = pair
        _save_for_both_modes(ctx, *values)
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx: Any, _pair_tangent: None, *tangents: Tensor | None) -> tuple:
        # Forward mode over the backward (torch.func.hessian is jacfwd(jacrev)).
        values, n = tuple(ctx.saved_tensors), ctx.pair.differentiable
        reference = ctx.pair.reference_of_differentiable(values[n:])
        return tuple(_jvp(reference, values[:n], tangents[:n]))

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor | None) -> tuple:
        values, n = tuple(ctx.saved_tensors), ctx.pair.differentiable
        if all(ct is None for ct in cotangents):
            return (None,) * (1 + len(values))
        reference = ctx.pair.reference_of_differentiable(values[n:])
        grads = _vjp(reference, values[:n], cotangents)
        return (None, *grads, *([None] * (len(values) - n)))


def _saved_layer(ctx: Any, layer_of: Callable, inputs: int) -> tuple[tuple, Callable]:
    """(the layer's differentiable inputs, the layer in the reference's ops as a function of
    them) from ctx.saved_tensors, whose first `inputs` are those inputs and the rest what
    ``layer_of(ctx, rest)`` needs besides (batch_sizes, zoneout's masks)."""
    saved = tuple(ctx.saved_tensors)
    return saved[:inputs], layer_of(ctx, saved[inputs:])


def _differentiable_by_reference(layer_of: Callable, inputs: int) -> Callable:
    """Decorator for the first-order gradients of a layer whose fused backward op is not
    differentiable itself (the GRU's, the LSTM variants').

    The decorated ``function(ctx, *incoming, *saved)`` runs the op on the incoming gradients and
    ``ctx.saved_tensors`` (whose first `inputs` are the layer's differentiable inputs), reading
    only Python attributes from ctx; it is then called as ``gradients(ctx, *incoming)``. A plain
    backward runs it. When the backward builds a graph (create_graph=True, a torch.func
    transform) the gradients come from :class:`_DifferentiableGradients`: the same op values,
    differentiable further through the vector-Jacobian product of ``layer_of(ctx, rest)``, the
    layer in the reference's ops (see :func:`_saved_layer`). (Under torch.compile, which builds no
    higher-order graph, the op alone.)
    """

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def gradients(ctx: Any, *incoming: Tensor | None) -> tuple:
            saved = tuple(ctx.saved_tensors)
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():
                with torch.no_grad():
                    return function(ctx, *incoming, *saved)
            count = len(incoming)

            def reference(*values: Tensor | None) -> list[Tensor | None]:
                layer = layer_of(ctx, values[count + inputs:])
                return _vjp(layer, values[count : count + inputs], values[:count])

            pair = _GradientPair(functools.partial(function, ctx), reference, count + inputs)
            return _DifferentiableGradients.apply(pair, *incoming, *saved)

        return gradients

    return decorate


_GruLayerInputs = tuple  # (input, h0, w_ih, w_hh, b_ih, b_hh); b_* may be None
_GruCellInputs = tuple  # (input, hx, w_ih, w_hh, b_ih, b_hh); b_* may be None


def _save_gru_layer(
    ctx: Any, inputs: _GruLayerInputs, batch_sizes: Tensor | None, reverse: bool, output: tuple
) -> None:
    out, _h_n, saved_gates, saved_hidden_n = output
    _save_for_both_modes(ctx, *inputs, batch_sizes, out, saved_gates, saved_hidden_n)
    ctx.reverse = reverse
    ctx.mark_non_differentiable(saved_gates, saved_hidden_n)
    ctx.set_materialize_grads(False)


def _gru_reference_layer(ctx: Any, rest: tuple) -> Callable:
    """A GRU layer in the reference's ops; rest: what its ctx saved after the inputs."""
    from lstm_ext import reference

    batch_sizes = rest[0]

    def layer(input, h0, w_ih, w_hh, b_ih, b_hh):
        return reference.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, reverse=ctx.reverse,
                                   batch_sizes=batch_sizes)

    return layer


@_differentiable_by_reference(_gru_reference_layer, inputs=6)
def _gru_layer_gradients(
    ctx: Any, grad_output: Tensor | None, grad_h_n: Tensor | None, input: Tensor, h0: Tensor,
    w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
    batch_sizes: Tensor | None, out: Tensor, saved_gates: Tensor, saved_hidden_n: Tensor,
) -> tuple[Tensor | None, ...]:
    """The gradients of one GRU layer, in _GruLayerInputs' order."""
    if saved_gates.numel() == 0 and out.numel() > 0:
        # Called with training=False yet differentiated: recompute (see _layer_gradients).
        out, _, saved_gates, saved_hidden_n = gru_forward(
            input, h0, w_ih, w_hh, b_ih, b_hh, ctx.reverse, True, batch_sizes
        )
    grads = torch.ops.lstm_ext._gru_backward.default(
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_h_n, h0), input, h0, w_ih, w_hh,
        out, saved_gates, saved_hidden_n, ctx.reverse, batch_sizes,
    )
    grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = grads
    if b_ih is None:
        grad_b_ih = grad_b_hh = None
    return grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


def _save_gru_cell(ctx: Any, inputs: _GruCellInputs, output: tuple) -> None:
    _h, saved_gates, saved_hidden_n = output
    _save_for_both_modes(ctx, *inputs, saved_gates, saved_hidden_n)
    ctx.mark_non_differentiable(saved_gates, saved_hidden_n)
    ctx.set_materialize_grads(False)


def _gru_reference_cell(ctx: Any, rest: tuple) -> Callable:
    """A GRU step in the reference's ops (as a function with a tuple of outputs)."""
    from lstm_ext import reference

    def cell(input, hx, w_ih, w_hh, b_ih, b_hh):
        return (reference.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh),)

    return cell


@_differentiable_by_reference(_gru_reference_cell, inputs=6)
def _gru_cell_gradients(
    ctx: Any, grad_h: Tensor | None, input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, saved_gates: Tensor, saved_hidden_n: Tensor,
) -> tuple[Tensor | None, ...]:
    """The gradients of one GRU step, in _GruCellInputs' order."""
    if grad_h is None:
        return (None,) * 6
    if saved_gates.numel() == 0 and hx.numel() > 0:
        _, saved_gates, saved_hidden_n = gru_cell_forward(input, hx, w_ih, w_hh, b_ih, b_hh, True)
    grads = torch.ops.lstm_ext._gru_cell_backward.default(
        grad_h, input, hx, w_ih, w_hh, saved_gates, saved_hidden_n
    )
    grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = grads
    if b_ih is None:
        grad_b_ih = grad_b_hh = None
    return grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


class GruLayerFunction(torch.autograd.Function):
    """One GRU layer in one direction (``gru_forward`` with training=True), differentiable to any
    order (beyond the first through the reference).

    ``GruLayerFunction.apply(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)`` returns
    ``gru_forward``'s four outputs.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse):
        return gru_forward(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, True, batch_sizes)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        *layer_inputs, batch_sizes, reverse = inputs
        _save_gru_layer(ctx, tuple(layer_inputs), batch_sizes, reverse, output)

    @staticmethod
    def backward(ctx: Any, grad_output, grad_h_n, *_saved) -> tuple:
        return (*_gru_layer_gradients(ctx, grad_output, grad_h_n), None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple:
        # Forward mode through the reference's math (the fused kernels have no tangent pass).
        inputs, layer = _saved_layer(ctx, _gru_reference_layer, 6)
        out, h_n = _jvp(layer, inputs, tangents[:6])
        return out, h_n, None, None


class GruCellFunction(torch.autograd.Function):
    """One GRU step (``gru_cell_forward`` with training=True), differentiable to any order.

    ``GruCellFunction.apply(input, hx, w_ih, w_hh, b_ih, b_hh)`` returns (h, saved_gates,
    saved_hidden_n).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, hx, w_ih, w_hh, b_ih, b_hh):
        return gru_cell_forward(input, hx, w_ih, w_hh, b_ih, b_hh, True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _save_gru_cell(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, grad_h, *_saved) -> tuple:
        return _gru_cell_gradients(ctx, grad_h)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple:
        inputs, cell = _saved_layer(ctx, _gru_reference_cell, 6)
        (h,) = _jvp(cell, inputs, tangents[:6])
        return h, None, None


class _CompiledGruLayerFunction(_NoForwardMode, GruLayerFunction):
    pass


class _CompiledGruCellFunction(_NoForwardMode, GruCellFunction):
    pass


def apply_gru_layer(
    input: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, batch_sizes: Tensor | None, reverse: bool,
) -> tuple[Tensor, ...]:
    """:class:`GruLayerFunction` applied (its jvp-less twin under torch.compile)."""
    return _apply(GruLayerFunction, _CompiledGruLayerFunction,
                  input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse)


def apply_gru_cell(
    input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, ...]:
    """:class:`GruCellFunction` applied (its jvp-less twin under torch.compile)."""
    return _apply(GruCellFunction, _CompiledGruCellFunction, input, hx, w_ih, w_hh, b_ih, b_hh)


def _gru_forward_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    input, h0, w_ih, w_hh, b_ih, b_hh, reverse, _training, *rest = inputs
    batch_sizes = rest[0] if rest else None
    _save_gru_layer(ctx, (input, h0, w_ih, w_hh, b_ih, b_hh), batch_sizes, reverse, output)


def _gru_forward_backward(ctx: Any, grad_output, grad_h_n, *_saved) -> tuple:
    # In the op's argument order: ..., b_ih, b_hh, reverse, training, batch_sizes.
    return (*_gru_layer_gradients(ctx, grad_output, grad_h_n), None, None, None)


def _gru_cell_forward_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _save_gru_cell(ctx, inputs[:6], output)


def _gru_cell_forward_backward(ctx: Any, grad_h, *_saved) -> tuple:
    return (*_gru_cell_gradients(ctx, grad_h), None)


torch.library.register_autograd(
    "lstm_ext::gru_forward", _gru_forward_backward, setup_context=_gru_forward_setup_context
)
torch.library.register_autograd(
    "lstm_ext::gru_cell_forward",
    _gru_cell_forward_backward,
    setup_context=_gru_cell_forward_setup_context,
)
for _name in ("_gru_backward", "_gru_cell_backward"):
    torch.library.register_autograd(
        f"lstm_ext::{_name}", _refuse_raw_backward_differentiation(_name),
        setup_context=_no_context,
    )


# ----------------------------------------------------------------------------------------------
# The LSTM variants' op (peepholes, coupled input and forget gates): wrapper, fake kernel and
# autograd, as the GRU's: beyond the first order and in forward mode through the reference; per
# sample under vmap.


def lstm_variant_forward(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    peephole: Tensor | None,
    coupled_gates: bool,
    reverse: bool = False,
    training: bool = False,
    w_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None,
    zoneout_h: Tensor | None = None,
    zoneout_c: Tensor | None = None,
    zoneout: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`lstm_forward` for an LSTM variant.

    Args:
        peephole: ``[3, H]`` rows (w_ci, w_cf, w_co), or None: ``i`` and ``f`` read
            ``w_ci * c_{t-1}``, ``w_cf * c_{t-1}``; ``o`` reads ``w_co * c_t``.
        coupled_gates: ``f = 1 - i``; the weights have no forget rows (w_ih ``[3H, C]``, w_hh
            ``[3H, P]``, biases ``[3H]``, gate order i, g, o) and saved_gates is ``[T, N, 3H]``.
        zoneout_h, zoneout_c: zoneout's training masks, 1 where a unit of h_t (c_t) keeps its
            previous value, ``[T, N, H]`` (packed ``[rows, H]``), both or neither.
        zoneout: without masks, the probability of keeping (eval: the expectation
            ``zoneout * previous + (1 - zoneout) * new``); 0 turns zoneout off. Zoneout excludes
            projections; with it saved_hidden holds each step's c_t before zoneout.
        The rest: as :func:`lstm_forward`.
    """
    return torch.ops.lstm_ext.lstm_variant_forward.default(
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, coupled_gates, reverse, training, w_hr,
        batch_sizes, zoneout_h, zoneout_c, zoneout,
    )


@torch.library.register_fake("lstm_ext::lstm_variant_forward")
def _lstm_variant_forward_fake(
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, coupled_gates, reverse, training, w_hr=None,
    batch_sizes=None, zoneout_h=None, zoneout_c=None, zoneout=0.0,
):
    hidden = c0.shape[1]
    proj = w_hh.shape[1]
    steps = input.shape[:-1]
    output = input.new_empty(*steps, proj)
    h_n = input.new_empty(h0.shape[0], proj)
    c_n = input.new_empty(h0.shape[0], hidden)
    if not training:
        return output, h_n, c_n, input.new_empty(0), input.new_empty(0), input.new_empty(0)
    gates = (3 if coupled_gates else 4) * hidden
    zoned = zoneout_h is not None or zoneout > 0
    saved_hidden = (
        input.new_empty(*steps, hidden) if w_hr is not None or zoned else input.new_empty(0)
    )
    return (
        output, h_n, c_n, input.new_empty(*steps, gates), input.new_empty(*steps, hidden),
        saved_hidden,
    )


@torch.library.register_fake("lstm_ext::_lstm_variant_backward")
def _lstm_variant_backward_fake(
    grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, peephole, coupled_gates, output,
    saved_gates, saved_cells, reverse, w_hr=None, batch_sizes=None, saved_hidden=None,
    zoneout_h=None, zoneout_c=None, zoneout=0.0,
):
    return (
        input.new_empty(input.shape),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_hh.new_empty(w_hh.shape[0]),
        w_hr.new_empty(w_hr.shape) if w_hr is not None else w_hh.new_empty(0),
        peephole.new_empty(peephole.shape) if peephole is not None else w_hh.new_empty(0),
    )


# (input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, w_hr); b_*, peephole, w_hr may be None
_VariantLayerInputs = tuple
# What a variant layer's call says besides its differentiable inputs: (coupled_gates, batch_sizes,
# reverse, zoneout_h, zoneout_c, zoneout).
_VariantConfig = tuple


def _save_variant_layer(
    ctx: Any, inputs: _VariantLayerInputs, config: _VariantConfig, output: tuple
) -> None:
    coupled, batch_sizes, reverse, zoneout_h, zoneout_c, zoneout = config
    out, _h_n, _c_n, saved_gates, saved_cells, saved_hidden = output
    _save_for_both_modes(
        ctx, *inputs, batch_sizes, zoneout_h, zoneout_c, out, saved_gates, saved_cells,
        saved_hidden,
    )
    ctx.coupled, ctx.reverse, ctx.zoneout = coupled, reverse, zoneout
    ctx.mark_non_differentiable(saved_gates, saved_cells, saved_hidden)
    ctx.set_materialize_grads(False)


def _zoneout_options(zoneout_h: Tensor | None, zoneout_c: Tensor | None,
                     zoneout: float) -> dict[str, Any]:
    """The reference's zoneout arguments for an op call's (masks per step, or eval's p)."""
    if zoneout_h is None:
        return dict(zoneout=zoneout, training=False)
    hidden = zoneout_h.shape[-1]
    return dict(training=True, zoneout_masks=(zoneout_h.reshape(-1, hidden),
                                              zoneout_c.reshape(-1, hidden)))


def _variant_reference_layer(ctx: Any, rest: tuple) -> Callable:
    """A variant layer in the reference's ops, with the forward's zoneout masks."""
    from lstm_ext import reference

    batch_sizes, zoneout_h, zoneout_c = rest[:3]
    options = _zoneout_options(zoneout_h, zoneout_c, ctx.zoneout)

    def layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, w_hr):
        return reference.lstm_variant_layer(
            input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse=ctx.reverse, w_hr=w_hr,
            batch_sizes=batch_sizes, peephole=peephole, coupled_gates=ctx.coupled, **options,
        )

    return layer


@_differentiable_by_reference(_variant_reference_layer, inputs=9)
def _variant_layer_gradients(
    ctx: Any, grad_output: Tensor | None, grad_h_n: Tensor | None, grad_c_n: Tensor | None,
    input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, peephole: Tensor | None, w_hr: Tensor | None,
    batch_sizes: Tensor | None, zoneout_h: Tensor | None, zoneout_c: Tensor | None, out: Tensor,
    saved_gates: Tensor, saved_cells: Tensor, saved_hidden: Tensor,
) -> tuple[Tensor | None, ...]:
    """The gradients of one variant layer, in _VariantLayerInputs' order."""
    if saved_gates.numel() == 0 and out.numel() > 0:
        # Called with training=False yet differentiated: recompute (see _layer_gradients).
        out, _, _, saved_gates, saved_cells, saved_hidden = lstm_variant_forward(
            input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, ctx.coupled, ctx.reverse, True, w_hr,
            batch_sizes, zoneout_h, zoneout_c, ctx.zoneout,
        )
    grads = torch.ops.lstm_ext._lstm_variant_backward.default(
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_h_n, h0),
        _zeros_if_none(grad_c_n, c0), input, h0, c0, w_ih, w_hh, peephole, ctx.coupled, out,
        saved_gates, saved_cells, ctx.reverse, w_hr, batch_sizes, saved_hidden, zoneout_h,
        zoneout_c, ctx.zoneout,
    )
    grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, grad_peephole = grads
    grad_b = grad_bias if b_ih is not None else None
    return (
        grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b, grad_b,
        grad_peephole if peephole is not None else None,
        grad_w_hr if w_hr is not None else None,
    )


class LstmVariantLayerFunction(torch.autograd.Function):
    """One variant LSTM layer in one direction (``lstm_variant_forward`` with training=True).

    ``LstmVariantLayerFunction.apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, w_hr,
    coupled_gates, batch_sizes, reverse, zoneout_h, zoneout_c, zoneout)`` returns its six
    outputs; differentiable to any order (beyond the first through the reference).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, w_hr, coupled_gates,
                batch_sizes, reverse, zoneout_h, zoneout_c, zoneout):
        return lstm_variant_forward(
            input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, coupled_gates, reverse, True, w_hr,
            batch_sizes, zoneout_h, zoneout_c, zoneout,
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _save_variant_layer(ctx, tuple(inputs[:9]), tuple(inputs[9:]), output)

    @staticmethod
    def backward(ctx: Any, grad_output, grad_h_n, grad_c_n, *_saved) -> tuple:
        grads = _variant_layer_gradients(ctx, grad_output, grad_h_n, grad_c_n)
        return (*grads, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple:
        inputs, layer = _saved_layer(ctx, _variant_reference_layer, 9)
        out, h_n, c_n = _jvp(layer, inputs, tangents[:9])
        return out, h_n, c_n, None, None, None


class _CompiledLstmVariantLayerFunction(_NoForwardMode, LstmVariantLayerFunction):
    pass


def apply_lstm_variant_layer(
    input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, peephole: Tensor | None, w_hr: Tensor | None, coupled_gates: bool,
    batch_sizes: Tensor | None, reverse: bool, zoneout_h: Tensor | None = None,
    zoneout_c: Tensor | None = None, zoneout: float = 0.0,
) -> tuple[Tensor, ...]:
    """:class:`LstmVariantLayerFunction` applied (its jvp-less twin under torch.compile)."""
    return _apply(
        LstmVariantLayerFunction, _CompiledLstmVariantLayerFunction,
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, w_hr, coupled_gates, batch_sizes,
        reverse, zoneout_h, zoneout_c, zoneout,
    )


def _lstm_variant_forward_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, coupled, reverse, _training, *rest = inputs
    w_hr, batch_sizes, zoneout_h, zoneout_c, zoneout = (list(rest) + [None] * 4 + [0.0])[:5]
    _save_variant_layer(
        ctx, (input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, w_hr),
        (coupled, batch_sizes, reverse, zoneout_h, zoneout_c, zoneout), output,
    )


def _lstm_variant_forward_backward(ctx: Any, grad_output, grad_h_n, grad_c_n, *_saved) -> tuple:
    grads = _variant_layer_gradients(ctx, grad_output, grad_h_n, grad_c_n)
    *first, grad_peephole, grad_w_hr = grads
    # In the op's argument order: ..., b_hh, peephole, coupled_gates, reverse, training, w_hr,
    # batch_sizes, zoneout_h, zoneout_c, zoneout.
    return (*first, grad_peephole, None, None, None, grad_w_hr, None, None, None, None)


torch.library.register_autograd(
    "lstm_ext::lstm_variant_forward",
    _lstm_variant_forward_backward,
    setup_context=_lstm_variant_forward_setup_context,
)
torch.library.register_autograd(
    "lstm_ext::_lstm_variant_backward",
    _refuse_raw_backward_differentiation("_lstm_variant_backward"),
    setup_context=_no_context,
)


# ----------------------------------------------------------------------------------------------
# The layer-norm LSTM's op: wrapper, fake kernels and first-order autograd, as the variants'.


def lstm_layernorm_forward(
    input_part: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    weight_hh: Tensor,
    weight_c: Tensor,
    bias_c: Tensor,
    peephole: Tensor | None,
    coupled_gates: bool,
    reverse: bool = False,
    training: bool = False,
    batch_sizes: Tensor | None = None,
    zoneout_h: Tensor | None = None,
    zoneout_c: Tensor | None = None,
    zoneout: float = 0.0,
) -> tuple[Tensor, ...]:
    """The recurrence of one layer-norm LSTM layer (Ba et al. 2016, haste's LayerNormLSTM).

    Args:
        input_part: the input's share of the pre-activations, ``[T, N, G*H]`` (packed
            ``[rows, G*H]``; G = 4, or 3 with coupled_gates):
            ``layer_norm(x W_ih^T, weight=gain_ih) + b_ih + b_hh``, computed for all steps at
            once by the caller.
        weight_hh: ``[G*H]`` the gain of each step's ``layer_norm(h_{t-1} W_hh^T)`` (no bias).
        weight_c, bias_c: ``[H]`` of ``layer_norm(c_t)`` in ``h_t = o * tanh(...)``.
        The rest: as :func:`lstm_variant_forward` (no projections).

    Returns:
        (output, h_n, c_n, saved_gates, saved_cells, saved_hidden, saved_norm_hh, saved_norm_c,
        saved_rstd); the saved tensors are empty unless training.
    """
    return torch.ops.lstm_ext.lstm_layernorm_forward.default(
        input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, coupled_gates, reverse,
        training, batch_sizes, zoneout_h, zoneout_c, zoneout,
    )


@torch.library.register_fake("lstm_ext::lstm_layernorm_forward")
def _lstm_layernorm_forward_fake(
    input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, coupled_gates, reverse,
    training, batch_sizes=None, zoneout_h=None, zoneout_c=None, zoneout=0.0,
):
    hidden = c0.shape[1]
    steps = input_part.shape[:-1]
    output = input_part.new_empty(*steps, hidden)
    h_n = input_part.new_empty(h0.shape[0], hidden)
    c_n = input_part.new_empty(h0.shape[0], hidden)
    if not training:
        return (output, h_n, c_n, *(input_part.new_empty(0) for _ in range(6)))
    zoned = zoneout_h is not None or zoneout > 0
    return (
        output, h_n, c_n, input_part.new_empty(input_part.shape),
        input_part.new_empty(*steps, hidden),
        input_part.new_empty(*steps, hidden) if zoned else input_part.new_empty(0),
        input_part.new_empty(input_part.shape), input_part.new_empty(*steps, hidden),
        input_part.new_empty(*steps, 2),
    )


@torch.library.register_fake("lstm_ext::_lstm_layernorm_backward")
def _lstm_layernorm_backward_fake(
    grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole,
    coupled_gates, output, saved_gates, saved_cells, saved_hidden, saved_norm_hh, saved_norm_c,
    saved_rstd, reverse, batch_sizes=None, zoneout_h=None, zoneout_c=None, zoneout=0.0,
):
    return (
        saved_gates.new_empty(saved_gates.shape),
        h0.new_empty(h0.shape),
        c0.new_empty(c0.shape),
        w_hh.new_empty(w_hh.shape),
        weight_hh.new_empty(weight_hh.shape),
        weight_c.new_empty(weight_c.shape),
        bias_c.new_empty(bias_c.shape),
        peephole.new_empty(peephole.shape) if peephole is not None else w_hh.new_empty(0),
    )


# (input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole); peephole may be None
_LayerNormInputs = tuple
# (coupled_gates, batch_sizes, reverse, zoneout_h, zoneout_c, zoneout)
_LayerNormConfig = tuple


def _save_layernorm_layer(
    ctx: Any, inputs: _LayerNormInputs, config: _LayerNormConfig, output: tuple
) -> None:
    coupled, batch_sizes, reverse, zoneout_h, zoneout_c, zoneout = config
    out, _h_n, _c_n, *saved = output
    # input_part itself: for a double backward (the reference differentiates through it) and to
    # recompute a forward run with training=False, which saved nothing.
    _save_for_both_modes(ctx, *inputs, batch_sizes, zoneout_h, zoneout_c, out, *saved)
    ctx.coupled, ctx.reverse, ctx.zoneout = coupled, reverse, zoneout
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)


def _layernorm_reference_recurrence(ctx: Any, rest: tuple) -> Callable:
    """A layer-norm layer's recurrence in the reference's ops, with the forward's masks."""
    from lstm_ext import reference

    batch_sizes, zoneout_h, zoneout_c = rest[:3]
    options = _zoneout_options(zoneout_h, zoneout_c, ctx.zoneout)

    def recurrence(input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole):
        return reference.lstm_layernorm_recurrence(
            input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, reverse=ctx.reverse,
            batch_sizes=batch_sizes, peephole=peephole, coupled_gates=ctx.coupled, **options,
        )

    return recurrence


@_differentiable_by_reference(_layernorm_reference_recurrence, inputs=8)
def _layernorm_layer_gradients(
    ctx: Any, grad_output: Tensor | None, grad_h_n: Tensor | None, grad_c_n: Tensor | None,
    input_part: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, weight_hh: Tensor,
    weight_c: Tensor, bias_c: Tensor, peephole: Tensor | None, batch_sizes: Tensor | None,
    zoneout_h: Tensor | None, zoneout_c: Tensor | None, out: Tensor, *saved: Tensor,
) -> tuple[Tensor | None, ...]:
    """The gradients of one layer-norm layer, in _LayerNormInputs' order."""
    if saved[0].numel() == 0 and out.numel() > 0:
        # Called with training=False yet differentiated: recompute (see _layer_gradients).
        out, _, _, *saved = lstm_layernorm_forward(
            input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, ctx.coupled,
            ctx.reverse, True, batch_sizes, zoneout_h, zoneout_c, ctx.zoneout,
        )
    grads = torch.ops.lstm_ext._lstm_layernorm_backward.default(
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_h_n, h0),
        _zeros_if_none(grad_c_n, c0), h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole,
        ctx.coupled, out, *saved, ctx.reverse, batch_sizes, zoneout_h, zoneout_c, ctx.zoneout,
    )
    *first, grad_peephole = grads
    return (*first, grad_peephole if peephole is not None else None)


class LstmLayerNormLayerFunction(torch.autograd.Function):
    """One layer-norm LSTM layer's recurrence in one direction (``lstm_layernorm_forward`` with
    training=True).

    ``LstmLayerNormLayerFunction.apply(input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c,
    peephole, coupled_gates, batch_sizes, reverse, zoneout_h, zoneout_c, zoneout)`` returns its
    nine outputs; differentiable to any order (beyond the first through the reference).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, coupled_gates,
                batch_sizes, reverse, zoneout_h, zoneout_c, zoneout):
        return lstm_layernorm_forward(
            input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, coupled_gates,
            reverse, True, batch_sizes, zoneout_h, zoneout_c, zoneout,
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        _save_layernorm_layer(ctx, tuple(inputs[:8]), tuple(inputs[8:]), output)

    @staticmethod
    def backward(ctx: Any, grad_output, grad_h_n, grad_c_n, *_saved) -> tuple:
        grads = _layernorm_layer_gradients(ctx, grad_output, grad_h_n, grad_c_n)
        return (*grads, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> tuple:
        inputs, recurrence = _saved_layer(ctx, _layernorm_reference_recurrence, 8)
        out, h_n, c_n = _jvp(recurrence, inputs, tangents[:8])
        return out, h_n, c_n, None, None, None, None, None, None


class _CompiledLstmLayerNormLayerFunction(_NoForwardMode, LstmLayerNormLayerFunction):
    pass


def apply_lstm_layernorm_layer(
    input_part: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, weight_hh: Tensor,
    weight_c: Tensor, bias_c: Tensor, peephole: Tensor | None, coupled_gates: bool,
    batch_sizes: Tensor | None, reverse: bool, zoneout_h: Tensor | None = None,
    zoneout_c: Tensor | None = None, zoneout: float = 0.0,
) -> tuple[Tensor, ...]:
    """:class:`LstmLayerNormLayerFunction` applied (its jvp-less twin under torch.compile)."""
    return _apply(
        LstmLayerNormLayerFunction, _CompiledLstmLayerNormLayerFunction,
        input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, coupled_gates,
        batch_sizes, reverse, zoneout_h, zoneout_c, zoneout,
    )


def _lstm_layernorm_forward_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    (input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, coupled, reverse,
     _training, *rest) = inputs
    batch_sizes, zoneout_h, zoneout_c, zoneout = (list(rest) + [None] * 3 + [0.0])[:4]
    _save_layernorm_layer(
        ctx, (input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole),
        (coupled, batch_sizes, reverse, zoneout_h, zoneout_c, zoneout), output,
    )


def _lstm_layernorm_forward_backward(ctx: Any, grad_output, grad_h_n, grad_c_n, *_saved) -> tuple:
    grads = _layernorm_layer_gradients(ctx, grad_output, grad_h_n, grad_c_n)
    # In the op's argument order: ..., peephole, coupled_gates, reverse, training, batch_sizes,
    # zoneout_h, zoneout_c, zoneout.
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd(
    "lstm_ext::lstm_layernorm_forward",
    _lstm_layernorm_forward_backward,
    setup_context=_lstm_layernorm_forward_setup_context,
)
torch.library.register_autograd(
    "lstm_ext::_lstm_layernorm_backward",
    _refuse_raw_backward_differentiation("_lstm_layernorm_backward"),
    setup_context=_no_context,
)
