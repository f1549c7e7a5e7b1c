"""Typed wrappers of the ``torch.ops.lstm_ext`` operators, their fake kernels and autograd formulas.

The C++ library registers the schemas and the device kernels. This module adds what makes the ops
first-class PyTorch citizens: a fake (meta) kernel for each, so ``torch.compile`` and
``torch.library.opcheck`` can trace them, and an autograd formula for each forward op, which calls
the matching private backward op. Double backward is refused with a clear error.

Shapes: ``T`` time, ``N`` batch, ``C`` input size, ``H`` hidden size, ``P`` projection size
(``P = H`` without projections); ``rows`` the rows of a packed batch (the sum of its batch_sizes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["lstm_forward", "lstm_cell_forward"]


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
# Autograd: each forward op's backward is its private backward op.


def _lstm_forward_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, _training, *rest = inputs
    w_hr, batch_sizes = (list(rest) + [None, None])[:2]
    out, _h_n, _c_n, saved_gates, saved_cells, saved_hidden = output
    ctx.save_for_backward(
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, out, saved_gates, saved_cells,
        saved_hidden,
    )
    ctx.reverse = reverse
    ctx.mark_non_differentiable(saved_gates, saved_cells, saved_hidden)
    # Otherwise autograd would allocate zero gradients for the saved buffers too ([T, N, 4H]).
    ctx.set_materialize_grads(False)


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _lstm_forward_backward(
    ctx: Any,
    grad_output: Tensor | None,
    grad_h_n: Tensor | None,
    grad_c_n: Tensor | None,
    *_saved: Tensor | None,
) -> tuple:
    (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, out, saved_gates, saved_cells,
     saved_hidden) = ctx.saved_tensors
    if saved_gates.numel() == 0 and out.numel() > 0:
        # Called with training=False (nothing saved) yet differentiated: recompute what backward
        # needs rather than fail. The functional layer passes training=True whenever a gradient
        # may be needed, so this path is rare.
        with torch.no_grad():
            out, _, _, saved_gates, saved_cells, saved_hidden = lstm_forward(
                input, h0, c0, w_ih, w_hh, b_ih, b_hh, ctx.reverse, True, w_hr, batch_sizes
            )
    grad_output = _zeros_if_none(grad_output, out)
    grad_h_n = _zeros_if_none(grad_h_n, h0)
    grad_c_n = _zeros_if_none(grad_c_n, c0)
    grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = (
        torch.ops.lstm_ext._lstm_backward.default(
            grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, out, saved_gates,
            saved_cells, ctx.reverse, w_hr, batch_sizes,
            saved_hidden if w_hr is not None else None,
        )
    )
    grad_b = grad_bias if b_ih is not None else None
    grad_w_hr = grad_w_hr if w_hr is not None else None
    return (
        grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b, grad_b, None, None, grad_w_hr,
        None,
    )


def _lstm_cell_forward_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, _training = inputs
    _h, c, saved_gates = output
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, c, saved_gates)
    ctx.mark_non_differentiable(saved_gates)
    ctx.set_materialize_grads(False)


def _lstm_cell_forward_backward(
    ctx: Any, grad_h: Tensor | None, grad_c: Tensor | None, *_saved: Tensor | None
) -> tuple:
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, c, saved_gates = ctx.saved_tensors
    if saved_gates.numel() == 0 and c.numel() > 0:
        # Called with training=False: recompute the activations (see _lstm_forward_backward).
        with torch.no_grad():
            _, c, saved_gates = lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, True)
    grad_h = _zeros_if_none(grad_h, hx)
    grad_c = _zeros_if_none(grad_c, cx)
    grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias = (
        torch.ops.lstm_ext._lstm_cell_backward.default(
            grad_h, grad_c, input, hx, cx, w_ih, w_hh, c, saved_gates
        )
    )
    grad_b = grad_bias if b_ih is not None else None
    return grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b, grad_b, None


def _no_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    pass


def _refuse_double_backward(ctx: Any, *grads: Tensor) -> tuple:
    raise RuntimeError(
        "lstm_ext: double backward (the gradient of a gradient through lstm_ext's LSTM) is not "
        "supported. Use torch.nn.LSTM's native path for higher-order gradients."
    )


torch.library.register_autograd(
    "lstm_ext::lstm_forward", _lstm_forward_backward, setup_context=_lstm_forward_setup_context
)
torch.library.register_autograd(
    "lstm_ext::lstm_cell_forward",
    _lstm_cell_forward_backward,
    setup_context=_lstm_cell_forward_setup_context,
)
torch.library.register_autograd(
    "lstm_ext::_lstm_backward", _refuse_double_backward, setup_context=_no_context
)
torch.library.register_autograd(
    "lstm_ext::_lstm_cell_backward", _refuse_double_backward, setup_context=_no_context
)
