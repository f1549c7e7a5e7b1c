"""The LSTM variants of lstm_ext.LSTM / LSTMCell (peephole, coupled_gates, layer_norm, zoneout,
forget_bias): modules against the oracle (lstm_ext.reference.lstm_variant_layer / _cell, itself
tested in test_reference_variants.py) built from the modules' own parameters, the variant ops
(opcheck, gradcheck), each CPU path, construction and behaviour."""

from __future__ import annotations

import copy
import functools
import io
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import TOLERANCES
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_ext
from lstm_ext import ops, reference

f64, f32 = torch.float64, torch.float32
FEATURES, STEPS = 5, 4
SEED = 1234
LAYER_NORM_KEYS = ("weight_ih", "weight_hh", "weight_c", "bias_c")


# --- the oracle, from the module's own parameters ---------------------------------------------


def _weights(module: torch.nn.Module, suffix: str) -> dict:
    """A layer's (or the cell's) parameters, as the reference's keyword arguments."""
    def get(name):
        return getattr(module, name + suffix, None)

    variant = module.variant
    layer_norm = None
    if variant.layer_norm:
        layer_norm = {key: get("layer_norm_" + key) for key in LAYER_NORM_KEYS}
    return dict(
        w_ih=get("weight_ih"), w_hh=get("weight_hh"), b_ih=get("bias_ih"), b_hh=get("bias_hh"),
        peephole=get("peephole"), coupled_gates=variant.coupled_gates, layer_norm=layer_norm,
        zoneout=variant.zoneout, training=module.training,
    )


def _draw_masks(module: torch.nn.Module, rows: int, dtype: torch.dtype, cells: int) -> list:
    """The masks the module draws after torch.manual_seed(SEED), per layer and direction."""
    torch.manual_seed(SEED)
    return [
        reference.zoneout_masks(rows, module.hidden_size, module.variant.zoneout, dtype=dtype)
        for _ in range(cells)
    ]


def _oracle_lstm(module: lstm_ext.LSTM, input, hx=None):
    """(output, h_n, c_n) of the stacked LSTM from reference.lstm_variant_layer; dropout 0."""
    packed = isinstance(input, PackedSequence)
    if packed:
        x, batch_sizes, sorted_indices, unsorted_indices = input
        batch = int(batch_sizes[0])
    else:
        x, batch_sizes = (input.transpose(0, 1) if module.batch_first else input), None
        batch = x.shape[1]
    directions = 2 if module.bidirectional else 1
    cells = module.num_layers * directions
    if hx is None:
        h0 = x.new_zeros(cells, batch, module.proj_size or module.hidden_size)
        c0 = x.new_zeros(cells, batch, module.hidden_size)
    else:
        h0, c0 = hx
        if packed:
            h0, c0 = h0[:, sorted_indices], c0[:, sorted_indices]
    masks = None
    if module.training and module.variant.zoneout > 0:
        masks = _draw_masks(module, x.shape[0] if packed else x.shape[0] * x.shape[1], x.dtype,
                            cells)
    layer_input, h_n, c_n = x, [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            out, h, c = reference.lstm_variant_layer(
                layer_input, h0[index], c0[index], **_weights(module, suffix),
                reverse=direction == 1, w_hr=getattr(module, "weight_hr" + suffix, None),
                batch_sizes=batch_sizes, zoneout_masks=None if masks is None else masks[index],
            )
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=-1)
    h_n, c_n = torch.stack(h_n), torch.stack(c_n)
    if packed:
        return layer_input, h_n[:, unsorted_indices], c_n[:, unsorted_indices]
    output = layer_input.transpose(0, 1) if module.batch_first else layer_input
    return output, h_n, c_n


def _oracle_cell(cell: lstm_ext.LSTMCell, x, hx=None):
    unbatched = x.dim() == 1
    if unbatched:
        x = x.unsqueeze(0)
        hx = None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
    if hx is None:
        zeros = x.new_zeros(x.shape[0], cell.hidden_size)
        hx = (zeros, zeros)
    masks = None
    if cell.training and cell.variant.zoneout > 0:
        masks = _draw_masks(cell, x.shape[0], x.dtype, 1)[0]
    weights = _weights(cell, "")
    h, c = reference.lstm_variant_cell(
        x, hx, weights.pop("w_ih"), weights.pop("w_hh"), weights.pop("b_ih"),
        weights.pop("b_hh"), **weights, zoneout_masks=masks,
    )
    return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


# --- comparing -----------------------------------------------------------------------------------


def _loss(outputs) -> torch.Tensor:
    """A loss that weighs every output element differently (signs included)."""
    return sum(
        (out * torch.linspace(-1.0, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum()
        for out in outputs
    )


# float32 with layer norm: the fused op and the oracle round differently (sums over rows in another
# order), and each normalization divides by a row's standard deviation, which amplifies rounding.
# Measured against the float64 oracle (2 layers, H=17, N=20): the float32 oracle's own gradients
# are off by up to 3e-4 absolute (at magnitudes up to 164), the fused op's by up to 2e-4; their
# difference from each other is of the same order, beyond the default 1e-5 float32 tolerance.
LAYER_NORM_F32_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def _tolerance(dtype, module=None) -> dict:
    if dtype == f32 and module is not None and module.variant.layer_norm:
        return LAYER_NORM_F32_TOLERANCE
    return TOLERANCES[dtype]


def _zero_by_construction(name: str, module) -> bool:
    """With H = 1 the normalization of c_t sees rows of one value: LN(c_t) is exactly 0, so the
    gain of that normalization has gradient exactly 0. The oracle's autograd returns rounding
    noise there, amplified by 1/sqrt(eps) = 316 (in float32 up to 1e-3, growing with N and T)."""
    return (module is not None and module.variant.layer_norm and module.hidden_size == 1
            and "layer_norm_weight_c" in name)


def _compare(actual, expected, names, dtype, what, module=None) -> None:
    for name, a, e in zip(names, actual, expected, strict=True):
        if _zero_by_construction(str(name), module):
            assert torch.equal(a, torch.zeros_like(a)), f"{what} {name}: expected exactly 0"
            continue
        torch.testing.assert_close(
            a, e, **_tolerance(dtype, module), msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def _compare_with_grads(run, oracle, leaves: dict, module, dtype) -> None:
    """run() and oracle() (each a tuple of tensors) agree, and so do the gradients of one loss of
    them with respect to leaves and every parameter of module; run() under no_grad (the
    inference op) agrees too. run() is called after torch.manual_seed(SEED) (zoneout's masks)."""
    torch.manual_seed(SEED)
    actual = run()
    expected = oracle()
    names = ["output", "h", "c"][-len(actual):]
    _compare(actual, expected, names, dtype, "forward", module)
    wrt = {**leaves, **dict(module.named_parameters())}
    grads = torch.autograd.grad(_loss(actual), list(wrt.values()), retain_graph=True)
    ref_grads = torch.autograd.grad(_loss(expected), list(wrt.values()), retain_graph=True)
    _compare(grads, ref_grads, [f"grad {n}" for n in wrt], dtype, "backward", module)
    torch.manual_seed(SEED)
    with torch.no_grad():
        _compare(run(), expected, names, dtype, "no_grad forward", module)


# --- 1. module parity ---------------------------------------------------------------------------

LSTM_CASES = {
    "peephole-H17": dict(hidden=17, peephole=True),
    "coupled-H33": dict(hidden=33, coupled_gates=True),
    "peephole-coupled-H1": dict(hidden=1, peephole=True, coupled_gates=True),
    "peephole-coupled-2layers-bidir-H17": dict(
        hidden=17, num_layers=2, bidirectional=True, peephole=True, coupled_gates=True),
    "peephole-batch_first-nobias-H64": dict(
        hidden=64, batch_first=True, bias=False, peephole=True),
    "coupled-2layers-batch_first-nobias-H17": dict(
        hidden=17, num_layers=2, batch_first=True, bias=False, coupled_gates=True),
    "peephole-bidir-no_h0-H33": dict(hidden=33, bidirectional=True, peephole=True, h0=False),
    "peephole-proj3-2layers-bidir-H17": dict(
        hidden=17, num_layers=2, bidirectional=True, proj_size=3, peephole=True),
    "coupled-proj5-H33": dict(hidden=33, proj_size=5, coupled_gates=True),
    "peephole-coupled-proj2-bidir-H64": dict(
        hidden=64, bidirectional=True, proj_size=2, peephole=True, coupled_gates=True),
    "layer_norm-2layers-H17": dict(hidden=17, num_layers=2, layer_norm=True),
    "layer_norm-peephole-coupled-bidir-H1": dict(
        hidden=1, bidirectional=True, layer_norm=True, peephole=True, coupled_gates=True),
    "zoneout_eval-2layers-bidir-H33": dict(
        hidden=33, num_layers=2, bidirectional=True, zoneout=0.3, train=False),
    "zoneout_eval-peephole-batch_first-H17": dict(
        hidden=17, batch_first=True, zoneout=0.4, peephole=True, train=False),
    "zoneout_train-2layers-bidir-H17": dict(
        hidden=17, num_layers=2, bidirectional=True, zoneout=0.3),
    "zoneout_train-peephole-coupled-nobias-H64": dict(
        hidden=64, zoneout=0.5, peephole=True, coupled_gates=True, bias=False),
    "zoneout_train-layer_norm-H17": dict(hidden=17, zoneout=0.3, layer_norm=True),
    "all-train-2layers-bidir-H17": dict(
        hidden=17, num_layers=2, bidirectional=True, peephole=True, coupled_gates=True,
        layer_norm=True, zoneout=0.25),
    "all-eval-batch_first-H33": dict(
        hidden=33, batch_first=True, peephole=True, coupled_gates=True, layer_norm=True,
        zoneout=0.25, train=False),
    "peephole-eval-H17": dict(hidden=17, peephole=True, train=False),
    "forget_bias-H17": dict(hidden=17, forget_bias=1.0),
    "packed-peephole-coupled-2layers-bidir-H17": dict(
        hidden=17, num_layers=2, bidirectional=True, peephole=True, coupled_gates=True,
        packed=True),
    "packed-coupled-no_h0-H64": dict(hidden=64, coupled_gates=True, packed=True, h0=False),
    "packed-peephole-proj3-bidir-H17": dict(
        hidden=17, bidirectional=True, proj_size=3, peephole=True, packed=True),
    "packed-zoneout_train-bidir-H33": dict(
        hidden=33, bidirectional=True, zoneout=0.3, packed=True),
    "packed-zoneout_train-peephole-2layers-H17": dict(
        hidden=17, num_layers=2, zoneout=0.3, peephole=True, packed=True),
    "packed-zoneout_eval-H17": dict(hidden=17, zoneout=0.3, packed=True, train=False),
    "packed-layer_norm-bidir-H17": dict(
        hidden=17, bidirectional=True, layer_norm=True, packed=True),
    "unbatched-peephole-coupled-zoneout_train-H17": dict(
        hidden=17, peephole=True, coupled_gates=True, zoneout=0.3, unbatched=True),
}
MODULE_KEYS = ("num_layers", "bias", "batch_first", "bidirectional", "proj_size", "peephole",
               "coupled_gates", "layer_norm", "zoneout", "forget_bias")
# (dtype, batch): the CPU float32 fused path changes at batch >= 16.
DTYPE_BATCH = [pytest.param(f64, 3, id="float64-N3"), pytest.param(f32, 5, id="float32-N5"),
               pytest.param(f32, 20, id="float32-N20")]


def _lengths(batch: int, steps: int) -> list[int]:
    """Unsorted lengths in [1, steps], the first one steps."""
    return [steps - (5 * i) % steps for i in range(batch)]


def run_lstm_case(case: dict, dtype: torch.dtype, batch: int) -> None:
    """One LSTM_CASES entry: module vs oracle, forward and every gradient."""
    hidden = case["hidden"]
    module = lstm_ext.LSTM(
        FEATURES, hidden, dtype=dtype, **{k: case[k] for k in MODULE_KEYS if k in case}
    ).train(case.get("train", True))
    directions = 2 if module.bidirectional else 1
    cells = module.num_layers * directions
    steps = STEPS + 1 if case.get("packed") else STEPS
    unbatched = case.get("unbatched", False)
    if unbatched:
        batch = 1
    shape = (batch, steps) if module.batch_first else (steps, batch)
    x = torch.randn(*shape, FEATURES, dtype=dtype, requires_grad=True)
    leaves = {"input": x}
    hx = None
    if case.get("h0", True):
        h0 = (0.5 * torch.randn(cells, batch, module.proj_size or hidden, dtype=dtype))
        c0 = torch.randn(cells, batch, hidden, dtype=dtype)
        hx = (h0.requires_grad_(), c0.requires_grad_())
        leaves.update(h0=hx[0], c0=hx[1])
    if case.get("packed"):
        sequence = pack_padded_sequence(x, _lengths(batch, steps), enforce_sorted=False)

        def run():
            output, (h_n, c_n) = module(sequence, hx)
            return output.data, h_n, c_n

        _compare_with_grads(run, lambda: _oracle_lstm(module, sequence, hx), leaves, module,
                            dtype)
        return
    if unbatched:
        # [T, C] and states [L*D, P]: the oracle runs the same as a batch of one.
        hx_u = None if hx is None else (hx[0][:, 0], hx[1][:, 0])

        def run():
            output, (h_n, c_n) = module(x[:, 0], hx_u)
            return output.unsqueeze(1), h_n.unsqueeze(1), c_n.unsqueeze(1)

        _compare_with_grads(run, lambda: _oracle_lstm(module, x, hx), leaves, module, dtype)
        return

    def run():
        output, (h_n, c_n) = module(x, hx)
        return output, h_n, c_n

    _compare_with_grads(run, lambda: _oracle_lstm(module, x, hx), leaves, module, dtype)


@pytest.mark.parametrize(("dtype", "batch"), DTYPE_BATCH)
@pytest.mark.parametrize("case", LSTM_CASES.values(), ids=LSTM_CASES.keys())
def test_lstm_matches_oracle(case, dtype, batch):
    run_lstm_case(case, dtype, batch)


CELL_CASES = {
    "peephole-H17": dict(hidden=17, peephole=True),
    "coupled-H33": dict(hidden=33, coupled_gates=True),
    "peephole-coupled-H1": dict(hidden=1, peephole=True, coupled_gates=True),
    "peephole-coupled-nobias-H64": dict(hidden=64, peephole=True, coupled_gates=True, bias=False),
    "layer_norm-peephole-H17": dict(hidden=17, layer_norm=True, peephole=True),
    # The cell's layer-norm gains once had 4H entries with coupled gates.
    "layer_norm-coupled-H17": dict(hidden=17, layer_norm=True, coupled_gates=True),
    "zoneout_eval-peephole-H33": dict(hidden=33, zoneout=0.3, peephole=True, train=False),
    "zoneout_train-coupled-H17": dict(hidden=17, zoneout=0.3, coupled_gates=True),
    "zoneout_train-layer_norm-H33": dict(hidden=33, zoneout=0.4, layer_norm=True),
    "no_hx-peephole-coupled-H17": dict(hidden=17, peephole=True, coupled_gates=True, hx=False),
    "unbatched-peephole-coupled-H17": dict(
        hidden=17, peephole=True, coupled_gates=True, unbatched=True),
    "unbatched-zoneout_train-H17": dict(hidden=17, zoneout=0.3, unbatched=True),
    "forget_bias-H17": dict(hidden=17, forget_bias=-0.5),
}
CELL_KEYS = ("bias", "peephole", "coupled_gates", "layer_norm", "zoneout", "forget_bias")


@pytest.mark.parametrize(("dtype", "batch"), DTYPE_BATCH)
@pytest.mark.parametrize("case", CELL_CASES.values(), ids=CELL_CASES.keys())
def test_lstm_cell_matches_oracle(case, dtype, batch):
    hidden = case["hidden"]
    cell = lstm_ext.LSTMCell(
        FEATURES, hidden, dtype=dtype, **{k: case[k] for k in CELL_KEYS if k in case}
    ).train(case.get("train", True))
    shape = () if case.get("unbatched") else (batch,)
    x = torch.randn(*shape, FEATURES, dtype=dtype, requires_grad=True)
    leaves = {"input": x}
    hx = None
    if case.get("hx", True):
        hx = (torch.randn(*shape, hidden, dtype=dtype, requires_grad=True),
              torch.randn(*shape, hidden, dtype=dtype, requires_grad=True))
        leaves.update(h=hx[0], c=hx[1])
    _compare_with_grads(lambda: cell(x, hx), lambda: _oracle_cell(cell, x, hx), leaves, cell,
                        dtype)


# --- 2. the ops --------------------------------------------------------------------------------


def _op_inputs(steps=4, batch=3, features=5, hidden=6, proj=0, coupled=False, peephole=True,
               bias=True, packed=False, dtype=f64, requires_grad=True):
    """(input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole), w_hr, batch_sizes for the variant op."""
    gates = (3 if coupled else 4) * hidden
    real = proj or hidden

    def make(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=dtype)).requires_grad_(requires_grad)

    batch_sizes = None
    if packed:
        lengths = sorted(_lengths(batch, steps), reverse=True)
        batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(steps)])
        x = make(int(batch_sizes.sum()), features)
    else:
        x = make(steps, batch, features)
    tensors = (
        x, make(batch, real, scale=0.5), make(batch, hidden), make(gates, features, scale=0.5),
        make(gates, real, scale=0.5), make(gates) if bias else None,
        make(gates) if bias else None, make(3, hidden) if peephole else None,
    )
    w_hr = make(proj, hidden, scale=0.5) if proj else None
    return tensors, w_hr, batch_sizes


def _masks(x: torch.Tensor, hidden: int, p: float = 0.4):
    rows = x.shape[:-1]
    mask_h, mask_c = reference.zoneout_masks(int(rows.numel()), hidden, p, dtype=x.dtype)
    return mask_h.view(*rows, hidden), mask_c.view(*rows, hidden)


# (training, coupled, peephole, bias, zoneout: None / "masks" / p, packed, reverse, proj)
FORWARD_OPCHECKS = {
    "train-peephole": (True, False, True, True, None, False, False, 0),
    "eval-peephole-coupled-reverse": (False, True, True, True, None, False, True, 0),
    "train-coupled-masks-reverse": (True, True, False, True, "masks", False, True, 0),
    "train-peephole-coupled-masks-packed": (True, True, True, True, "masks", True, False, 0),
    "eval-peephole-zoneout_p": (False, False, True, True, 0.3, False, False, 0),
    "eval-coupled-zoneout_p-packed-reverse": (False, True, False, False, 0.3, True, True, 0),
    "train-peephole-coupled-w_hr-packed-reverse": (True, True, True, True, None, True, True, 2),
    "eval-coupled-w_hr-nobias": (False, True, False, False, None, False, False, 3),
}


def _forward_op_args(training, coupled, peephole, bias, zoneout, packed, reverse, proj):
    tensors, w_hr, batch_sizes = _op_inputs(proj=proj, coupled=coupled, peephole=peephole,
                                            bias=bias, packed=packed)
    zoneout_h = zoneout_c = None
    if zoneout == "masks":
        zoneout_h, zoneout_c = _masks(tensors[0], tensors[2].shape[-1])
        zoneout = 0.0
    return (*tensors, coupled, reverse, training, w_hr, batch_sizes, zoneout_h, zoneout_c,
            zoneout or 0.0)


@pytest.mark.parametrize("config", FORWARD_OPCHECKS.values(), ids=FORWARD_OPCHECKS.keys())
def test_opcheck_lstm_variant_forward(config):
    torch.library.opcheck(torch.ops.lstm_ext.lstm_variant_forward.default,
                          _forward_op_args(*config))


@pytest.mark.parametrize("config", ["train-peephole", "train-coupled-masks-reverse",
                                    "train-peephole-coupled-w_hr-packed-reverse"])
def test_opcheck_lstm_variant_backward(config):
    args = _forward_op_args(*FORWARD_OPCHECKS[config])
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    input, h0, c0, w_ih, w_hh, _, _, peephole, coupled, reverse, _, w_hr, batch_sizes, \
        zoneout_h, zoneout_c, zoneout = detached
    out, h_n, c_n, gates, cells, hidden = ops.lstm_variant_forward(*detached)
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(
        torch.ops.lstm_ext._lstm_variant_backward.default,
        (*grads, input, h0, c0, w_ih, w_hh, peephole, coupled, out, gates, cells, reverse, w_hr,
         batch_sizes, hidden, zoneout_h, zoneout_c, zoneout),
    )


GRADCHECKS = {
    "peephole-coupled": dict(coupled=True),
    "peephole-coupled-reverse-nobias": dict(coupled=True, reverse=True, bias=False),
    "peephole-coupled-w_hr-packed": dict(coupled=True, proj=2, packed=True),
    "peephole-masks": dict(masks=True),
    "peephole-coupled-masks-packed-reverse": dict(coupled=True, masks=True, packed=True,
                                                  reverse=True),
    "peephole-zoneout_p": dict(zoneout=0.3),
}


@pytest.mark.parametrize("config", GRADCHECKS.values(), ids=GRADCHECKS.keys())
def test_gradcheck_apply_lstm_variant_layer(config):
    config = dict(config)
    reverse, masks, zoneout = (config.pop(k, d) for k, d in
                               (("reverse", False), ("masks", False), ("zoneout", 0.0)))
    tensors, w_hr, batch_sizes = _op_inputs(steps=3, batch=2, features=3, hidden=3, **config)
    coupled = config.get("coupled", False)
    zoneout_h, zoneout_c = _masks(tensors[0], 3) if masks else (None, None)
    present = [t for t in (*tensors, w_hr) if t is not None]

    def f(*args):
        it = iter(args)
        full = [None if t is None else next(it) for t in (*tensors, w_hr)]
        out, h, c, *_ = ops.apply_lstm_variant_layer(
            *full[:8], full[8], coupled, batch_sizes, reverse, zoneout_h, zoneout_c, zoneout)
        return out, h, c

    assert torch.autograd.gradcheck(f, present)


# The layer-norm op: its input is the input's share of the pre-activations (the module computes
# it with one GEMM and one layer_norm).


def _layernorm_op_args(training=True, coupled=False, peephole=True, zoneout=None, packed=False,
                       reverse=False, steps=4, batch=3, hidden=6, dtype=f64):
    """lstm_layernorm_forward's arguments; zoneout None, "masks" or p."""
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh, peep), _, batch_sizes = _op_inputs(
        steps=steps, batch=batch, features=5, hidden=hidden, coupled=coupled, peephole=peephole,
        packed=packed, dtype=dtype, requires_grad=False)
    gates = w_hh.shape[0]
    input_part = torch.nn.functional.layer_norm(x @ w_ih.t(), (gates,)) + b_ih
    weight_hh = 1 + 0.3 * torch.randn(gates, dtype=dtype)
    weight_c = 1 + 0.3 * torch.randn(hidden, dtype=dtype)
    bias_c = 0.3 * torch.randn(hidden, dtype=dtype)
    zoneout_h = zoneout_c = None
    if zoneout == "masks":
        zoneout_h, zoneout_c = _masks(input_part, hidden)
        zoneout = 0.0
    return (input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peep, coupled, reverse,
            training, batch_sizes, zoneout_h, zoneout_c, zoneout or 0.0)


# (training, coupled, peephole, zoneout, packed, reverse)
LAYER_NORM_OPCHECKS = {
    "train": (True, False, False, None, False, False),
    "eval-peephole-coupled-reverse": (False, True, True, None, False, True),
    "train-peephole-masks-packed": (True, False, True, "masks", True, False),
    "train-coupled-masks-reverse": (True, True, False, "masks", False, True),
    "eval-zoneout_p-packed-reverse": (False, False, True, 0.3, True, True),
}


@pytest.mark.parametrize("config", LAYER_NORM_OPCHECKS.values(), ids=LAYER_NORM_OPCHECKS.keys())
def test_opcheck_lstm_layernorm_forward(config):
    torch.library.opcheck(torch.ops.lstm_ext.lstm_layernorm_forward.default,
                          _layernorm_op_args(*config))


@pytest.mark.parametrize("config", ["train", "train-peephole-masks-packed",
                                    "train-coupled-masks-reverse"])
def test_opcheck_lstm_layernorm_backward(config):
    args = _layernorm_op_args(*LAYER_NORM_OPCHECKS[config])
    (_, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, coupled, reverse, _, batch_sizes,
     zoneout_h, zoneout_c, zoneout) = args
    out, h_n, c_n, *saved = ops.lstm_layernorm_forward(*args)
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(
        torch.ops.lstm_ext._lstm_layernorm_backward.default,
        (*grads, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, coupled, out, *saved,
         reverse, batch_sizes, zoneout_h, zoneout_c, zoneout),
    )


LAYER_NORM_GRADCHECKS = {
    "plain": dict(peephole=False),
    "peephole-coupled-reverse": dict(coupled=True, reverse=True),
    "peephole-masks-packed": dict(zoneout="masks", packed=True),
    "coupled-zoneout_p-packed-reverse": dict(coupled=True, peephole=False, zoneout=0.3,
                                             packed=True, reverse=True),
}


@pytest.mark.parametrize("config", LAYER_NORM_GRADCHECKS.values(),
                         ids=LAYER_NORM_GRADCHECKS.keys())
def test_gradcheck_apply_lstm_layernorm_layer(config):
    args = _layernorm_op_args(steps=3, batch=2, hidden=3, **config)
    (input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole, coupled, reverse, _,
     batch_sizes, zoneout_h, zoneout_c, zoneout) = args
    tensors = [input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole]
    present = [t.clone().requires_grad_() for t in tensors if t is not None]

    def f(*given):
        it = iter(given)
        full = [None if t is None else next(it) for t in tensors]
        out, h, c, *_ = ops.apply_lstm_layernorm_layer(
            *full, coupled, batch_sizes, reverse, zoneout_h, zoneout_c, zoneout)
        return out, h, c

    assert torch.autograd.gradcheck(f, present)


def test_layernorm_op_bad_input_raises():
    args = list(_layernorm_op_args())
    op = torch.ops.lstm_ext.lstm_layernorm_forward.default
    cases = [
        (0, args[0][..., :-1], r"expected input_part's last dimension to be 4H = 24"),
        (4, args[4][:-1], r"expected weight_hh of shape \[4H\] = \[24\], got \[23\]"),
        (5, args[5][:-1], r"expected weight_c of shape \[H\] = \[6\], got \[5\]"),
        (6, args[6].float(), r"bias_c has dtype Float but input_part has dtype Double"),
        (2, args[2][:, :-1], r"expected c0 of shape \[N, H\] = \[3, 6\], got \[3, 5\]"),
        (3, args[3][:-1], r"expected w_hh of shape \[4H, H\]"),
    ]
    for index, bad, message in cases:
        given = list(args)
        given[index] = bad
        with pytest.raises(RuntimeError, match=message):
            op(*given)
    # Backward after a forward run with training=False: nothing saved.
    out, h_n, c_n, *saved = op(*args[:10], False, *args[11:])
    with pytest.raises(RuntimeError, match="run with training=False"):
        torch.ops.lstm_ext._lstm_layernorm_backward.default(
            out, h_n, c_n, *args[1:7], args[7], args[8], out, *saved, args[9], None)


def test_layernorm_op_with_training_false_is_differentiable():
    # The recompute path: autograd through the raw op called with training=False.
    args = list(_layernorm_op_args(training=False))
    args[0] = args[0].clone().requires_grad_()
    out, h, c, *_ = ops.lstm_layernorm_forward(*args)
    (grad,) = torch.autograd.grad(out.sum() + h.sum() + c.sum(), args[0])
    args[10] = True
    out, h, c, *_ = ops.lstm_layernorm_forward(*args)
    (expected,) = torch.autograd.grad(out.sum() + h.sum() + c.sum(), args[0])
    torch.testing.assert_close(grad, expected, **TOLERANCES[f64])


# --- 3. every CPU path ---------------------------------------------------------------------------

CPU_PATH_CASES = ["peephole-coupled-2layers-bidir-H17", "peephole-coupled-proj2-bidir-H64",
                  "zoneout_train-peephole-coupled-nobias-H64", "packed-zoneout_train-bidir-H33",
                  "packed-peephole-proj3-bidir-H17", "zoneout_eval-2layers-bidir-H33",
                  "all-train-2layers-bidir-H17", "all-eval-batch_first-H33",
                  "packed-layer_norm-bidir-H17"]
CPU_PATH_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import lstm_ext
    sys.path.insert(0, {tests!r})
    import test_variants as t
    print(lstm_ext.build_info()["cpu_capability"])
    for name in {cases!r}:
        for batch in (5, 20):
            torch.manual_seed(0)
            t.run_lstm_case(t.LSTM_CASES[name], torch.float32, batch)
    print("ok")
    """
)


def _cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2"])
def test_cpu_path_matches_oracle(capability):
    # This process runs the best path (AVX512 here, if the CPU has it): the tests above. The
    # others are chosen once at import, so each runs in its own process.
    if capability == "AVX2" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU lacks AVX2")
    tests = str(pathlib.Path(__file__).resolve().parent)
    result = subprocess.run(
        [sys.executable, "-c", CPU_PATH_SCRIPT.format(tests=tests, cases=CPU_PATH_CASES)],
        cwd=pathlib.Path(tests).parent, env={**os.environ, "LSTM_EXT_CPU_CAPABILITY": capability},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert lines[0] == capability, f"ran {lines[0]} instead of {capability}"
    assert lines[-1] == "ok"


# --- 4. construction -----------------------------------------------------------------------------

TORCH_CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(num_layers=2, proj_size=3),
                 dict(bias=False, batch_first=True)]
OPTIONS_OFF = dict(peephole=False, coupled_gates=False, layer_norm=False, zoneout=0.0,
                   forget_bias=0.0)


def _assert_same_state(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("config", TORCH_CONFIGS, ids=str)
def test_options_off_is_torch_lstm(config):
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(5, 7, **config)
    torch.manual_seed(0)
    ours = lstm_ext.LSTM(5, 7, **config, **OPTIONS_OFF)
    _assert_same_state(ours.state_dict(), theirs.state_dict())
    assert repr(ours) == repr(theirs)
    _assert_same_state(lstm_ext.LSTM.from_torch(theirs).state_dict(), theirs.state_dict())
    converted = ours.to_torch()
    assert type(converted) is torch.nn.LSTM
    _assert_same_state(converted.state_dict(), theirs.state_dict())


@pytest.mark.parametrize("bias", [True, False])
def test_options_off_is_torch_lstm_cell(bias):
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(5, 7, bias)
    torch.manual_seed(0)
    ours = lstm_ext.LSTMCell(5, 7, bias, **OPTIONS_OFF)
    _assert_same_state(ours.state_dict(), theirs.state_dict())
    assert repr(ours) == repr(theirs)
    _assert_same_state(lstm_ext.LSTMCell.from_torch(theirs).state_dict(), theirs.state_dict())
    _assert_same_state(ours.to_torch().state_dict(), theirs.state_dict())


@pytest.mark.parametrize("config", [dict(num_layers=2, bidirectional=True), dict(proj_size=3)],
                         ids=str)
def test_forget_bias_shifts_torch_init(config):
    hidden, b = 7, 1.5
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(5, hidden, **config).state_dict()
    torch.manual_seed(0)
    module = lstm_ext.LSTM(5, hidden, **config, forget_bias=b)
    ours = module.state_dict()
    assert list(ours) == list(theirs)
    forget = slice(hidden, 2 * hidden)
    for key, value in theirs.items():
        expected = value.clone()
        if key.startswith("bias_ih"):
            expected[forget] += b
        assert torch.equal(ours[key], expected), key
    assert not module.variant.changes_forward
    _assert_same_state(module.to_torch().state_dict(), ours)


def test_forget_bias_cell():
    torch.manual_seed(0)
    theirs = torch.nn.LSTMCell(5, 7).state_dict()
    torch.manual_seed(0)
    cell = lstm_ext.LSTMCell(5, 7, forget_bias=-0.5)
    ours = cell.state_dict()
    assert list(ours) == list(theirs)
    expected = theirs["bias_ih"].clone()
    expected[7:14] += -0.5
    assert torch.equal(ours["bias_ih"], expected)
    for key in ("weight_ih", "weight_hh", "bias_hh"):
        assert torch.equal(ours[key], theirs[key]), key
    _assert_same_state(cell.to_torch().state_dict(), ours)


@pytest.mark.parametrize("option", [dict(peephole=True), dict(coupled_gates=True),
                                    dict(layer_norm=True), dict(zoneout=0.1)], ids=str)
def test_to_torch_refuses_variants(option):
    for make, name in ((lstm_ext.LSTM, "LSTM"), (lstm_ext.LSTMCell, "LSTMCell")):
        module = make(5, 7, **option)
        with pytest.raises(ValueError, match=f"has no torch.nn.{name} equivalent"):
            module.to_torch()


def test_coupled_gates_shapes():
    lstm = lstm_ext.LSTM(5, 7, 2, bidirectional=True, proj_size=3, coupled_gates=True)
    shapes = {name: tuple(p.shape) for name, p in lstm.named_parameters()}
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        inputs = 5 if suffix.startswith("_l0") else 6
        assert shapes["weight_ih" + suffix] == (21, inputs)
        assert shapes["weight_hh" + suffix] == (21, 3)
        assert shapes["bias_ih" + suffix] == shapes["bias_hh" + suffix] == (21,)
        assert shapes["weight_hr" + suffix] == (3, 7)
    assert len(lstm._flat_weights) == 20
    assert all(w is getattr(lstm, n) for w, n in zip(lstm._flat_weights, lstm._flat_weights_names))
    cell = lstm_ext.LSTMCell(5, 7, coupled_gates=True)
    assert {n: tuple(p.shape) for n, p in cell.named_parameters()} == {
        "weight_ih": (21, 5), "weight_hh": (21, 7), "bias_ih": (21,), "bias_hh": (21,)}
    bound = 1 / 7**0.5
    for module in (lstm, cell):
        for name, p in module.named_parameters():
            assert p.abs().max() <= bound and p.std() > 0, name


def _assert_variant_init(module, hidden: int, forget_bias: float = 0.0) -> None:
    bound = 1 / hidden**0.5
    for name, p in module.named_parameters():
        if name.startswith("layer_norm_bias_c"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif name.startswith("layer_norm_weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.startswith("bias_ih") and forget_bias:
            forget = p[hidden : 2 * hidden] - forget_bias
            rest = torch.cat([p[:hidden], p[2 * hidden :]])
            assert forget.abs().max() <= bound + 1e-6 and rest.abs().max() <= bound, name
        else:
            assert p.abs().max() <= bound and p.std() > 0, name


@pytest.mark.parametrize("make", [lstm_ext.LSTM, lstm_ext.LSTMCell], ids=["LSTM", "LSTMCell"])
def test_variant_init_and_reset_parameters(make):
    hidden = 9
    extra = dict(num_layers=2, bidirectional=True) if make is lstm_ext.LSTM else {}
    for options in (dict(peephole=True, layer_norm=True, forget_bias=2.0),
                    dict(peephole=True, coupled_gates=True)):
        module = make(5, hidden, **extra, **options)
        if make is lstm_ext.LSTM:
            peepholes = [n for n, _ in module.named_parameters() if n.startswith("peephole")]
            assert peepholes == ["peephole_l0", "peephole_l0_reverse", "peephole_l1",
                                 "peephole_l1_reverse"]
        _assert_variant_init(module, hidden, options.get("forget_bias", 0.0))
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(5.0)
        module.reset_parameters()
        _assert_variant_init(module, hidden, options.get("forget_bias", 0.0))


def test_repr_shows_options():
    lstm = lstm_ext.LSTM(5, 7, 2, peephole=True, coupled_gates=True, layer_norm=True,
                         zoneout=0.25)
    assert repr(lstm) == ("LSTM(5, 7, num_layers=2, peephole=True, coupled_gates=True, "
                          "layer_norm=True, zoneout=0.25)")
    assert repr(lstm_ext.LSTM(5, 7, proj_size=3, forget_bias=1.0)) == (
        "LSTM(5, 7, proj_size=3, forget_bias=1.0)")
    assert repr(lstm_ext.LSTMCell(5, 7, bias=False, peephole=True)) == (
        "LSTMCell(5, 7, bias=False, peephole=True)")


REFUSED = [
    (dict(zoneout=1.0), "{}: zoneout must be in [0, 1), got 1.0"),
    (dict(zoneout=-0.1), "{}: zoneout must be in [0, 1), got -0.1"),
    (dict(forget_bias=float("nan")), "{}: forget_bias must be finite, got nan"),
    (dict(forget_bias=1.0, coupled_gates=True),
     "{}: forget_bias=1.0 with coupled_gates=True: coupled gates have no forget gate (f = 1 - i)"),
    (dict(forget_bias=1.0, bias=False), "{}: forget_bias=1.0 needs bias=True"),
]
REFUSED_WITH_PROJECTIONS = [
    (dict(layer_norm=True), "layer_norm=True"),
    (dict(zoneout=0.2), "zoneout=0.2"),
    (dict(layer_norm=True, zoneout=0.2), "layer_norm=True and zoneout=0.2"),
]


@pytest.mark.parametrize(("options", "message"), REFUSED, ids=[str(o) for o, _ in REFUSED])
def test_refused_options(options, message):
    for make, name in ((lstm_ext.LSTM, "LSTM"), (lstm_ext.LSTMCell, "LSTMCell")):
        with pytest.raises(ValueError, match=re.escape(message.format(name))):
            make(5, 7, **options)


@pytest.mark.parametrize(("options", "what"), REFUSED_WITH_PROJECTIONS,
                         ids=[w for _, w in REFUSED_WITH_PROJECTIONS])
def test_refused_with_projections(options, what):
    message = (f"LSTM: proj_size=3 with {what} is not supported (projections combine with "
               "peephole and coupled_gates)")
    with pytest.raises(ValueError, match=re.escape(message)):
        lstm_ext.LSTM(5, 7, proj_size=3, **options)
    lstm_ext.LSTM(5, 7, proj_size=3, peephole=True, coupled_gates=True)  # these combine


# --- 5. behaviour --------------------------------------------------------------------------------


def _zoneout_run(module, x, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    output, (h_n, c_n) = module(x)
    return torch.cat([output.flatten(), h_n.flatten(), c_n.flatten()])


@pytest.mark.parametrize("options", [dict(zoneout=0.5), dict(zoneout=0.5, peephole=True),
                                     dict(zoneout=0.5, layer_norm=True)], ids=str)
def test_zoneout_training_follows_the_seed_and_eval_is_deterministic(options):
    lstm = lstm_ext.LSTM(5, 8, 2, bidirectional=True, **options)
    x = torch.randn(6, 3, 5)
    first, again, other = (_zoneout_run(lstm, x, seed) for seed in (7, 7, 8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    lstm.eval()
    state = torch.get_rng_state()
    evaluated = _zoneout_run(lstm, x)
    assert torch.equal(torch.get_rng_state(), state), "eval drew random numbers"
    assert torch.equal(evaluated, _zoneout_run(lstm, x, 9))
    assert not torch.allclose(evaluated, first)
    assert not torch.allclose(evaluated, other)


def test_zoneout_cell_follows_the_seed_and_eval_is_deterministic():
    cell = lstm_ext.LSTMCell(5, 8, zoneout=0.5, peephole=True)
    x, hx = torch.randn(4, 5), (torch.randn(4, 8), torch.randn(4, 8))

    def run(seed):
        torch.manual_seed(seed)
        return torch.cat(cell(x, hx))

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))
    trained = run(3)
    cell.eval()
    evaluated = run(3)
    assert torch.equal(evaluated, run(4))
    assert not torch.allclose(evaluated, trained)


@pytest.mark.parametrize("options", [dict(peephole=True, coupled_gates=True),
                                     dict(layer_norm=True, peephole=True)], ids=str)
def test_compile_fullgraph_matches_eager(options):
    torch._dynamo.reset()
    lstm = lstm_ext.LSTM(4, 8, 2, batch_first=True, bidirectional=True, **options)
    x = torch.randn(3, 5, 4, requires_grad=True)

    def loss(x):
        output, (h_n, c_n) = lstm(x)
        return _loss([output, h_n, c_n])

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    try:
        wrt = [x, *lstm.parameters()]
        expected, actual = loss(x), compiled(x)
        torch.testing.assert_close(actual, expected, **TOLERANCES[f32])
        for e, a in zip(torch.autograd.grad(expected, wrt), torch.autograd.grad(actual, wrt)):
            torch.testing.assert_close(a, e, **TOLERANCES[f32])
    finally:
        torch._dynamo.reset()


def _outputs(module, x):
    module.eval()
    with torch.no_grad():
        output, (h_n, c_n) = module(x)
    return output, h_n, c_n


def test_save_load_and_deepcopy_round_trip():
    lstm = lstm_ext.LSTM(5, 7, 2, bidirectional=True, peephole=True, coupled_gates=True,
                         layer_norm=True, zoneout=0.2)
    x = torch.randn(4, 3, 5)
    buffer = io.BytesIO()
    torch.save(lstm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    fresh = lstm_ext.LSTM(5, 7, 2, bidirectional=True, peephole=True, coupled_gates=True,
                          layer_norm=True, zoneout=0.2)
    fresh.load_state_dict(lstm.state_dict())
    for other in (loaded, copy.deepcopy(lstm), fresh):
        assert other.variant == lstm.variant and repr(other) == repr(lstm)
        _assert_same_state(other.state_dict(), lstm.state_dict())
        for a, e in zip(_outputs(other, x), _outputs(lstm, x), strict=True):
            assert torch.equal(a, e)
    cell = lstm_ext.LSTMCell(5, 7, peephole=True, zoneout=0.3)
    buffer = io.BytesIO()
    torch.save(cell.state_dict(), buffer)
    buffer.seek(0)
    other = lstm_ext.LSTMCell(5, 7, peephole=True, zoneout=0.3)
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(3, 5)
    assert torch.equal(torch.cat(other.eval()(x)), torch.cat(cell.eval()(x)))
    assert torch.equal(torch.cat(copy.deepcopy(cell)(x)), torch.cat(cell(x)))


@pytest.mark.parametrize("options", [
    dict(peephole=True), dict(coupled_gates=True), dict(zoneout=0.3),
    dict(zoneout=0.3, train=False), dict(layer_norm=True, peephole=True),
    dict(layer_norm=True, zoneout=0.2, coupled_gates=True),
], ids=str)
def test_forward_mode_matches_oracle(options):
    # Forward mode (torch.func.jvp over input and parameters; forward_ad dual numbers through a
    # frozen module) runs the reference's math with the masks the forward drew.
    options = dict(options)
    train = options.pop("train", True)
    x = torch.randn(4, 2, 5, dtype=f64)
    lstm = lstm_ext.LSTM(5, 3, 2, bidirectional=True, dtype=f64, **options).train(train)
    cell = lstm_ext.LSTMCell(5, 3, dtype=f64, **options).train(train)
    for module, sample, oracle in ((lstm, x, _oracle_lstm), (cell, x[0], _oracle_cell)):
        params = {name: p.detach() for name, p in module.named_parameters()}
        tangents = {name: torch.randn_like(p) for name, p in params.items()}
        direction = torch.randn_like(sample)

        def ours(s, p, module=module):
            torch.manual_seed(SEED)  # zoneout's masks, as the oracle draws them
            return torch.func.functional_call(module, p, (s,))[0]

        def expected(s, p, module=module, oracle=oracle):
            with torch.nn.utils.stateless._reparametrize_module(module, p):
                return oracle(module, s)[0]

        results = (torch.func.jvp(ours, (sample, params), (direction, tangents)),
                   torch.func.jvp(expected, (sample, params), (direction, tangents)))
        _compare(*results, ["output", "tangent"], f64, "jvp", module)
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(sample, direction)
            with torch.no_grad():
                tangent = torch.autograd.forward_ad.unpack_dual(ours(dual, params)).tangent
        (_, input_only) = torch.func.jvp(functools.partial(expected, p=params), (sample,),
                                         (direction,))
        _compare([tangent], [input_only], ["tangent"], f64, "forward_ad", module)


SECOND_ORDER = {
    "peephole": dict(peephole=True),
    "coupled-peephole-packed": dict(coupled_gates=True, peephole=True, packed=True),
    "zoneout_train": dict(zoneout=0.3),
    "zoneout_eval": dict(zoneout=0.3, train=False),
    "layer_norm-peephole": dict(layer_norm=True, peephole=True),
    "layer_norm-coupled-zoneout_train-packed": dict(layer_norm=True, coupled_gates=True,
                                                     zoneout=0.2, packed=True),
}


def _second_order(run, module, x):
    """d/d(x, params) of ||d loss / d x||^2 for loss = sum of squares of run()'s output, and of
    the gradient penalty of a loss linear in the outputs (whose backward gets grad_outputs that do
    not require grad)."""
    wrt = [x, *module.parameters()]
    results = []
    for loss_of in (lambda out: out.square().sum(), lambda out: out.sum()):
        torch.manual_seed(SEED)  # zoneout's masks
        output = run()
        (grad,) = torch.autograd.grad(loss_of(output), x, create_graph=True)
        results += torch.autograd.grad(loss_of(output) + grad.square().sum(), wrt)
    return results


@pytest.mark.parametrize("options", SECOND_ORDER.values(), ids=SECOND_ORDER.keys())
def test_second_order_matches_oracle(options):
    # The fused first order, differentiated further through the reference (double backward).
    options = dict(options)
    packed, train = options.pop("packed", False), options.pop("train", True)
    torch.manual_seed(0)
    lstm = lstm_ext.LSTM(5, 3, 2, bidirectional=True, dtype=f64, **options).train(train)
    cell = lstm_ext.LSTMCell(5, 3, dtype=f64, **options).train(train)
    x = torch.randn(4, 3, 5, dtype=f64, requires_grad=True)
    if packed:
        lengths = [4, 2, 3]

        def run():
            sequence = pack_padded_sequence(x, lengths, enforce_sorted=False)
            return lstm(sequence)[0].data

        def oracle():
            sequence = pack_padded_sequence(x, lengths, enforce_sorted=False)
            return _oracle_lstm(lstm, sequence)[0]  # the packed data already
    else:
        def run():
            return lstm(x)[0]

        def oracle():
            return _oracle_lstm(lstm, x)[0]

    results = _second_order(run, lstm, x), _second_order(oracle, lstm, x)
    _compare(*results, range(len(results[0])), f64, "second order")
    results = (_second_order(lambda: cell(x[0])[0], cell, x),
               _second_order(lambda: _oracle_cell(cell, x[0])[0], cell, x))
    _compare(*results, range(len(results[0])), f64, "cell second order")


@pytest.mark.parametrize("options", [dict(peephole=True, coupled_gates=True),
                                     dict(zoneout=0.3, train=False),
                                     dict(layer_norm=True, peephole=True)], ids=str)
def test_torch_func_vmap_jacfwd_hessian_match_oracle(options):
    # Per-sample gradients, batched inference, jacfwd and hessian through the ops' per-sample vmap
    # rules. (Zoneout in training draws random masks, which vmap refuses by default.)
    options = dict(options)
    train = options.pop("train", True)
    lstm = lstm_ext.LSTM(5, 3, dtype=f64, **options).train(train)
    params = {name: p.detach() for name, p in lstm.named_parameters()}
    xs = torch.randn(2, 4, 2, 5, dtype=f64)

    def ours(p, x):
        return torch.func.functional_call(lstm, p, (x,))[0]

    def oracle(p, x):
        with torch.nn.utils.stateless._reparametrize_module(lstm, p):
            return _oracle_lstm(lstm, x)[0]

    for name, transform in (
        ("per-sample grad", lambda run: torch.func.vmap(torch.func.grad(
            lambda p, x: run(p, x).square().sum()), in_dims=(None, 0))(params, xs)),
        ("vmap", lambda run: torch.func.vmap(lambda x: run(params, x))(xs)),
        ("jacfwd", lambda run: torch.func.jacfwd(lambda x: run(params, x))(xs[0])),
        ("hessian", lambda run: torch.func.hessian(
            lambda x: run(params, x).square().sum())(xs[0, :2])),
    ):
        a, e = transform(ours), transform(oracle)
        names = list(a) if isinstance(a, dict) else [name]
        values = (list(a.values()), list(e.values())) if isinstance(a, dict) else ([a], [e])
        _compare(*values, names, f64, name, lstm)


def test_torch_func_grad_of_grad_matches_oracle():
    lstm = lstm_ext.LSTM(5, 3, dtype=f64, peephole=True, layer_norm=True)
    x = torch.randn(4, 2, 5, dtype=f64)
    params = {name: p.detach() for name, p in lstm.named_parameters()}

    def penalty(run):
        def inner(s):
            return run(s).square().sum()

        return torch.func.grad(lambda s: torch.func.grad(inner)(s).square().sum())(x)

    ours = penalty(lambda s: torch.func.functional_call(lstm, params, (s,))[0])
    expected = penalty(lambda s: _oracle_lstm(lstm, s)[0])
    _compare([ours], [expected], ["grad of grad"], f64, "torch.func")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_refuses_zoneout_in_training_mode(dynamo):
    # Every variant exports (test_onnx.py), zoneout in its eval form: in training mode its masks
    # are random draws, which an exported graph cannot hold. (The TorchScript exporter puts the
    # module in eval itself unless told to keep its mode.)
    lstm = lstm_ext.LSTM(4, 6, peephole=True, zoneout=0.2).train()
    x = torch.randn(3, 2, 4)
    options = {} if dynamo else dict(training=torch.onnx.TrainingMode.PRESERVE)
    message = ("lstm_ext ONNX export: lstm_ext.LSTM(peephole=True, zoneout=0.2) is in training "
               "mode, where zoneout draws random masks; call .eval() before exporting")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match=re.escape(message)):
            torch.onnx.export(lstm, (x,), io.BytesIO(), dynamo=dynamo, **options)


class _CountOps(TorchDispatchMode):
    """Counts the lstm_ext operator calls that reach the kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("lstm_ext."):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _count_ops(module, x, backward=True) -> dict[str, int]:
    with _CountOps() as mode:
        output = module(x)[0]
        if backward:
            output.sum().backward()
    return mode.counts


FORWARD = "lstm_ext.lstm_variant_forward.default"
BACKWARD = "lstm_ext._lstm_variant_backward.default"


@pytest.mark.parametrize("options", [dict(peephole=True), dict(coupled_gates=True),
                                     dict(zoneout=0.3), dict(peephole=True, zoneout=0.3)],
                         ids=str)
def test_variants_run_the_variant_op(options):
    x = torch.randn(4, 2, 5, requires_grad=True)
    lstm = lstm_ext.LSTM(5, 3, 2, bidirectional=True, **options)
    assert _count_ops(lstm, x) == {FORWARD: 4, BACKWARD: 4}
    assert _count_ops(lstm.eval(), x.detach(), backward=False) == {FORWARD: 4}
    cell = lstm_ext.LSTMCell(5, 3, **options)
    assert _count_ops(cell, x[0]) == {FORWARD: 1, BACKWARD: 1}


def test_layer_norm_runs_its_op_and_forget_bias_the_plain_one():
    x = torch.randn(4, 2, 5, requires_grad=True)
    forward = "lstm_ext.lstm_layernorm_forward.default"
    backward = "lstm_ext._lstm_layernorm_backward.default"
    lstm = lstm_ext.LSTM(5, 3, 2, bidirectional=True, layer_norm=True, peephole=True)
    assert _count_ops(lstm, x) == {forward: 4, backward: 4}
    assert _count_ops(lstm.eval(), x.detach(), backward=False) == {forward: 4}
    cell = lstm_ext.LSTMCell(5, 3, layer_norm=True, zoneout=0.2)
    assert _count_ops(cell, x[0]) == {forward: 1, backward: 1}
    counts = _count_ops(lstm_ext.LSTM(5, 3, forget_bias=1.0), x)
    assert counts == {"lstm_ext.lstm_forward.default": 1, "lstm_ext._lstm_backward.default": 1}
