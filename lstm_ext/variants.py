"""The LSTM variants of ``lstm_ext.LSTM`` / ``LSTMCell``: what the options mean and how one layer
of a variant runs.

The options (keyword arguments of the modules, all off by default, when the module is exactly
the drop-in for ``torch.nn.LSTM``):

* ``peephole``: i and f read ``w_ci * c_{t-1}``, ``w_cf * c_{t-1}``; o reads ``w_co * c_t`` (the
  form of ONNX's LSTM P input, oneDNN and TensorFlow). Parameter ``peephole_l{k}[_reverse]``
  ``[3, H]``, rows (w_ci, w_cf, w_co).
* ``coupled_gates`` (CIFG): ``f = 1 - i``; the forget rows are dropped, so weight_ih, weight_hh
  and the biases have 3H rows in gate order i, g, o.
* ``layer_norm``: the layer-norm LSTM of Ba et al. 2016 in haste's form: layer norm over the
  pre-activations of x W_ih^T and of h W_hh^T separately (gains ``layer_norm_weight_ih_l{k}``,
  ``layer_norm_weight_hh_l{k}`` [G*H], initialized to 1), and over c_t before the output tanh
  (``layer_norm_weight_c_l{k}`` [H], 1; ``layer_norm_bias_c_l{k}`` [H], 0).
* ``zoneout = p``: in training each unit of h and c keeps its previous value with probability p
  (masks from torch's generator, :func:`lstm_ext.reference.zoneout_masks`); in eval the
  expectation ``p * previous + (1 - p) * new`` (Krueger et al. 2016).
* ``forget_bias = b``: adds b to the forget gate's rows of bias_ih at initialization.

Peepholes, coupled gates and zoneout run on the fused ``lstm_ext::lstm_variant_forward`` op (its
CPU float32 path fuses all three into the packed-GEMM epilogues of the forward and backward
recurrences). A layer with layer norm computes the input's share of its pre-activations for all
steps in plain ops (one GEMM, one layer_norm) and runs the recurrence on the fused
``lstm_ext::lstm_layernorm_forward`` op, whose steps are an ATen GEMM and one pointwise pass per
row (CPU SIMD, one CUDA block per row) that normalizes the recurrent product and c_t in place.
Their gradients run the fused backward ops; differentiated again (double backward, torch.func's
nested grad) they go through the reference's ops, as forward mode (jvp) does; under vmap the ops
run once per sample.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lstm_ext import ops, reference

__all__ = ["LstmVariant", "run_variant_layer"]


@dataclasses.dataclass(frozen=True)
class LstmVariant:
    """The variant options of an LSTM module (see the module docstring)."""

    peephole: bool = False
    coupled_gates: bool = False
    layer_norm: bool = False
    zoneout: float = 0.0
    forget_bias: float = 0.0

    @property
    def changes_forward(self) -> bool:
        """Whether the forward differs from the plain LSTM's (forget_bias is an init choice)."""
        return self.peephole or self.coupled_gates or self.layer_norm or self.zoneout > 0

    @property
    def gates(self) -> int:
        return 3 if self.coupled_gates else 4

    def check(self, module: str, bias: bool, proj_size: int) -> None:
        """ValueError for option values and combinations that are not supported."""
        if not 0 <= self.zoneout < 1:
            raise ValueError(f"{module}: zoneout must be in [0, 1), got {self.zoneout}")
        if not math.isfinite(self.forget_bias):
            raise ValueError(f"{module}: forget_bias must be finite, got {self.forget_bias}")
        if self.forget_bias != 0 and self.coupled_gates:
            raise ValueError(
                f"{module}: forget_bias={self.forget_bias} with coupled_gates=True: coupled gates "
                "have no forget gate (f = 1 - i)"
            )
        if self.forget_bias != 0 and not bias:
            raise ValueError(f"{module}: forget_bias={self.forget_bias} needs bias=True")
        if proj_size > 0:
            unsupported = [
                name for name, on in (
                    ("layer_norm=True", self.layer_norm), (f"zoneout={self.zoneout}", self.zoneout)
                ) if on
            ]
            if unsupported:
                raise ValueError(
                    f"{module}: proj_size={proj_size} with {' and '.join(unsupported)} is not "
                    "supported (projections combine with peephole and coupled_gates)"
                )

    def extra_repr(self) -> str:
        """The options that are on, as ``repr`` shows them after torch's own arguments."""
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != field.default:
                parts.append(f"{field.name}={value}")
        return ", ".join(parts)

    def parameter_shapes(self, hidden_size: int) -> dict[str, tuple[int, ...]]:
        """The extra parameters of one layer and direction, by name prefix (before ``_l{k}``)."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.peephole:
            shapes["peephole"] = (3, hidden_size)
        if self.layer_norm:
            gate_rows = self.gates * hidden_size
            shapes["layer_norm_weight_ih"] = (gate_rows,)
            shapes["layer_norm_weight_hh"] = (gate_rows,)
            shapes["layer_norm_weight_c"] = (hidden_size,)
            shapes["layer_norm_bias_c"] = (hidden_size,)
        return shapes


def reset_variant_parameters(module: torch.nn.Module, variant: LstmVariant, suffixes: list[str],
                             hidden_size: int, bias_names: list[str]) -> None:
    """The variant parameters' initialization, after torch's (which drew every parameter from
    U(-1/sqrt(H), 1/sqrt(H)), peepholes included): layer-norm gains 1 and biases 0; forget_bias
    added to the forget rows of each bias_ih."""
    with torch.no_grad():
        if variant.layer_norm:
            for suffix in suffixes:
                for name in ("layer_norm_weight_ih", "layer_norm_weight_hh", "layer_norm_weight_c"):
                    getattr(module, name + suffix).fill_(1.0)
                getattr(module, "layer_norm_bias_c" + suffix).zero_()
        if variant.forget_bias != 0:
            for name in bias_names:
                getattr(module, name)[hidden_size : 2 * hidden_size] += variant.forget_bias


def run_variant_layer(
    variant: LstmVariant,
    extras: dict[str, Tensor],
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    batch_sizes: Tensor | None,
    reverse: bool,
    train: bool,
    needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction of a variant: (output, h_n, c_n), as ``lstm_ext.ops``' layers.

    ``extras``: the layer's variant parameters by name prefix (``peephole``,
    ``layer_norm_weight_ih``, ...). ``train``: the module's training mode (zoneout draws masks);
    ``needs_grad``: whether autograd records the call.
    """
    peephole = extras.get("peephole")
    zoneout_h = zoneout_c = None
    zoneout = variant.zoneout
    if train and zoneout > 0:
        # The masks the reference draws for the same call, in its row order.
        rows = input.shape[0] if batch_sizes is not None else input.shape[0] * input.shape[1]
        zoneout_h, zoneout_c = reference.zoneout_masks(
            rows, c0.shape[-1], zoneout, device=input.device, dtype=input.dtype
        )
        if batch_sizes is None:
            zoneout_h = zoneout_h.view(*input.shape[:2], -1)
            zoneout_c = zoneout_c.view(*input.shape[:2], -1)
        zoneout = 0.0
    if variant.layer_norm:
        # The input's share of every step at once, in plain ops that autograd differentiates:
        # one GEMM and one layer_norm over [rows, G*H]; the recurrence runs on the fused op. The
        # gain multiplies apart from layer_norm: ATen's layer_norm backward sums the gain's
        # gradient over rows in chunks that follow the thread count, while this product's
        # gradient is an ATen sum over dim 0, which gives the same bits on any thread count.
        input_part = F.layer_norm(
            input @ w_ih.t(), (w_ih.shape[0],), eps=reference.LAYER_NORM_EPS
        ) * extras["layer_norm_weight_ih"]
        if b_ih is not None:
            input_part = input_part + (b_ih + b_hh)
        ln_args = (extras["layer_norm_weight_hh"], extras["layer_norm_weight_c"],
                   extras["layer_norm_bias_c"], peephole, variant.coupled_gates)
        if needs_grad:
            out, h, c, *_ = ops.apply_lstm_layernorm_layer(
                input_part, h0, c0, w_hh, *ln_args, batch_sizes, reverse, zoneout_h, zoneout_c,
                zoneout,
            )
        else:
            out, h, c, *_ = ops.lstm_layernorm_forward(
                input_part, h0, c0, w_hh, *ln_args, reverse, False, batch_sizes, zoneout_h,
                zoneout_c, zoneout,
            )
        return out, h, c
    if needs_grad:
        out, h, c, *_ = ops.apply_lstm_variant_layer(
            input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, w_hr, variant.coupled_gates,
            batch_sizes, reverse, zoneout_h, zoneout_c, zoneout,
        )
    else:
        out, h, c, *_ = ops.lstm_variant_forward(
            input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, variant.coupled_gates, reverse,
            False, w_hr, batch_sizes, zoneout_h, zoneout_c, zoneout,
        )
    return out, h, c
