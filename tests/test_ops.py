"""The lstm_ext operators themselves: against the reference, gradcheck, opcheck, op-level checks."""

from __future__ import annotations

import pytest
import torch

import lstm_ext
from lstm_ext import ops, reference

OPS = ["lstm_forward", "_lstm_backward", "lstm_cell_forward", "_lstm_cell_backward"]


def _layer_args(
    steps=4, batch=3, features=5, hidden=6, bias=True, dtype=torch.float64, requires_grad=False
):
    def make(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)

    x, h0, c0 = make(steps, batch, features), make(batch, hidden), make(batch, hidden)
    w_ih, w_hh = make(4 * hidden, features) * 0.5, make(4 * hidden, hidden) * 0.5
    w_ih, w_hh = (
        w_ih.detach().requires_grad_(requires_grad),
        w_hh.detach().requires_grad_(requires_grad),
    )
    b_ih, b_hh = (make(4 * hidden), make(4 * hidden)) if bias else (None, None)
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_forward_matches_reference(dtype, reverse, bias):
    args = _layer_args(bias=bias, dtype=dtype, requires_grad=True)
    out, h_n, c_n, saved_gates, saved_cells, saved_hidden = ops.lstm_forward(
        *args, reverse=reverse, training=True
    )
    ref_out, ref_h, ref_c = reference.lstm_layer(*args, reverse=reverse)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(h_n, ref_h, **tol)
    torch.testing.assert_close(c_n, ref_c, **tol)
    assert saved_gates.shape == (4, 3, 24) and saved_cells.shape == (4, 3, 6)
    inputs = [a for a in args if a is not None]
    grads = torch.autograd.grad(out.sum() + h_n.square().sum() + 2 * c_n.sum(), inputs)
    ref_grads = torch.autograd.grad(ref_out.sum() + ref_h.square().sum() + 2 * ref_c.sum(), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


def test_inference_saves_nothing_and_matches_training():
    args = _layer_args()
    inf = ops.lstm_forward(*args, reverse=False, training=False)
    train = ops.lstm_forward(*args, reverse=False, training=True)
    assert inf[3].numel() == 0 and inf[4].numel() == 0
    for a, b in zip(inf[:3], train[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_backward_of_inference_call_is_refused():
    args = _layer_args()
    out, h_n, c_n, gates, cells, _ = ops.lstm_forward(*args, reverse=False, training=False)
    grads = (torch.ones_like(out), torch.zeros_like(h_n), torch.zeros_like(c_n))
    with pytest.raises(RuntimeError, match="training=False"):
        torch.ops.lstm_ext._lstm_backward(*grads, *args[:5], out, gates, cells, False)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_forward_gradcheck(reverse, bias):
    args = _layer_args(steps=3, batch=2, features=3, hidden=4, bias=bias, requires_grad=True)

    def f(*tensors):
        out, h_n, c_n, *_ = ops.lstm_forward(*tensors, reverse=reverse, training=True)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_forward_gradcheck(bias):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _layer_args(
        steps=1, batch=2, features=3, hidden=4, bias=bias, requires_grad=True
    )

    def f(*tensors):
        h, c, _ = ops.lstm_cell_forward(*tensors, training=True)
        return h, c

    assert torch.autograd.gradcheck(
        f, (x[0].detach().requires_grad_(), h0, c0, w_ih, w_hh, b_ih, b_hh)
    )


def _backward_args(reverse=False):
    args = _layer_args()
    out, h_n, c_n, gates, cells, _ = ops.lstm_forward(*args, reverse=reverse, training=True)
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    return (*grads, *args[:5], out, gates, cells, reverse)


def _cell_args(training):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _layer_args(steps=1)
    return (x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, training)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_lstm_forward(training, requires_grad, reverse):
    args = _layer_args(requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.lstm_ext.lstm_forward.default, (*args, reverse, training))


def test_opcheck_lstm_forward_without_bias():
    args = _layer_args(bias=False, requires_grad=True)
    torch.library.opcheck(torch.ops.lstm_ext.lstm_forward.default, (*args, False, True))


@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_lstm_backward(reverse):
    torch.library.opcheck(torch.ops.lstm_ext._lstm_backward.default, _backward_args(reverse))


@pytest.mark.parametrize("training", [False, True])
def test_opcheck_lstm_cell_forward(training):
    torch.library.opcheck(torch.ops.lstm_ext.lstm_cell_forward.default, _cell_args(training))


def test_opcheck_lstm_cell_backward():
    x, hx, cx, w_ih, w_hh, b_ih, b_hh, _ = _cell_args(True)
    h, c, gates = ops.lstm_cell_forward(x, hx, cx, w_ih, w_hh, b_ih, b_hh, True)
    args = (torch.randn_like(h), torch.randn_like(c), x, hx, cx, w_ih, w_hh, c, gates)
    torch.library.opcheck(torch.ops.lstm_ext._lstm_cell_backward.default, args)


def test_every_op_has_a_cpu_kernel_and_a_fake():
    for name in OPS:
        qualified = f"lstm_ext::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Meta") or (
            torch._library.simple_registry.singleton.find(qualified).fake_impl.kernel is not None
        ), name


def test_differentiating_the_private_backward_ops_is_refused_clearly():
    # Gradients of gradients go through the forward ops (tests/test_double_backward.py); the
    # private backward ops take the forward's outputs as inputs, so differentiating one directly
    # is refused, naming the op.
    args = _layer_args(requires_grad=True)
    out, h_n, c_n, gates, cells, _ = ops.lstm_forward(*args, reverse=False, training=True)
    grads = (torch.ones_like(out), torch.zeros_like(h_n), torch.zeros_like(c_n))
    grad_input = torch.ops.lstm_ext._lstm_backward(
        *grads, *args[:5], out.detach(), gates, cells, False
    )[0]
    with pytest.raises(RuntimeError, match="lstm_ext::_lstm_backward directly"):
        grad_input.sum().backward()
    x, hx, cx, w_ih, w_hh = (a[0] if a is args[0] else a for a in args[:5])
    h, c, gates = ops.lstm_cell_forward(x, hx, cx, w_ih, w_hh, None, None, True)
    grad_input = torch.ops.lstm_ext._lstm_cell_backward(
        torch.ones_like(h), torch.zeros_like(c), x, hx, cx, w_ih, w_hh, c.detach(), gates
    )[0]
    with pytest.raises(RuntimeError, match="lstm_ext::_lstm_cell_backward directly"):
        grad_input.sum().backward()


def test_backward_twice_with_retain_graph():
    # The backward op must not consume what forward saved.
    lstm = lstm_ext.LSTM(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    loss = lstm(x)[0].sum()
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_non_contiguous_inputs():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _layer_args()
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    w_ih_nc = w_ih.t().contiguous().t()
    h0_nc = h0.t().contiguous().t()
    expected = ops.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, training=False)
    actual = ops.lstm_forward(x_nc, h0_nc, c0, w_ih_nc, w_hh, b_ih, b_hh, training=False)
    for a, e in zip(actual[:3], expected[:3]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda a: {**a, "input": a["input"][0]},
            r"expected input of shape \[T, N, C\], got \[3, 5\]",
        ),
        (lambda a: {**a, "input": a["input"][:0]}, r"expected sequence length T > 0"),
        (
            lambda a: {**a, "h0": a["h0"][:2]},
            r"expected h0 of shape \[N, H\] = \[3, 6\], got \[2, 6\]",
        ),
        (
            lambda a: {**a, "c0": a["c0"][:, :5]},
            r"expected c0 of shape \[N, H\] = \[3, 6\], got \[3, 5\]",
        ),
        (
            lambda a: {**a, "w_ih": a["w_ih"][:, :4]},
            r"expected w_ih of shape \[4H, C\] = \[24, 5\], got \[24, 4\]",
        ),
        (
            lambda a: {**a, "w_hh": a["w_hh"][:20]},
            r"expected w_hh of shape \[4H, H\], got \[20, 6\]",
        ),
        (
            lambda a: {**a, "b_hh": a["b_hh"][:5]},
            r"expected b_hh of shape \[4H\] = \[24\], got \[5\]",
        ),
        (lambda a: {**a, "b_hh": None}, r"b_ih and b_hh must be given together"),
        (lambda a: {**a, "c0": a["c0"].float()}, r"c0 has dtype Float but input has dtype Double"),
        (
            lambda a: {**a, "w_ih": a["w_ih"].float()},
            r"w_ih has dtype Float but input has dtype Double",
        ),
        (
            lambda a: {**{k: v.long() if v is not None else None for k, v in a.items()}},
            r"expected a floating-point input, got dtype Long",
        ),
    ],
)
def test_lstm_forward_rejects_bad_input(mutate, message):
    names = ["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]
    args = mutate(dict(zip(names, _layer_args())))
    with pytest.raises(RuntimeError, match=r"lstm_ext::lstm_forward: " + message):
        torch.ops.lstm_ext.lstm_forward(*(args[n] for n in names), False, False)


def test_lstm_cell_forward_rejects_bad_input():
    x, hx, cx, w_ih, w_hh, b_ih, b_hh, training = _cell_args(False)
    with pytest.raises(
        RuntimeError, match=r"lstm_ext::lstm_cell_forward: expected input of shape \[N, C\]"
    ):
        torch.ops.lstm_ext.lstm_cell_forward(x[0], hx, cx, w_ih, w_hh, b_ih, b_hh, training)
    with pytest.raises(
        RuntimeError, match=r"expected hx of shape \[N, H\] = \[3, 6\], got \[3, 2\]"
    ):
        torch.ops.lstm_ext.lstm_cell_forward(x, hx[:, :2], cx, w_ih, w_hh, b_ih, b_hh, training)


# ---------------------------------------------------------------------------------------------
# Projections (w_hr) and packed batches (batch_sizes).

BATCH_SIZES = torch.tensor([4, 4, 3, 1, 1])  # T = 5, N = 4: sequence lengths 5, 3, 3, 2


def _extended_args(proj, packed, dtype=torch.float64, requires_grad=False, hidden=6, features=5):
    """(input, h0, c0, w_ih, w_hh, b_ih, b_hh), w_hr, batch_sizes for one layer."""
    batch, steps = 4, len(BATCH_SIZES)
    width = proj or hidden

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_(requires_grad)

    rows = int(BATCH_SIZES.sum()) if packed else None
    x = make(rows, features) if packed else make(steps, batch, features)
    args = (
        x,
        make(batch, width),
        make(batch, hidden),
        make(4 * hidden, features, scale=0.5),
        make(4 * hidden, width, scale=0.5),
        make(4 * hidden),
        make(4 * hidden),
    )
    w_hr = make(proj, hidden, scale=0.5) if proj else None
    return args, w_hr, (BATCH_SIZES if packed else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj,packed", [(3, False), (0, True), (2, True)])
def test_projection_and_packed_match_reference(dtype, reverse, proj, packed):
    args, w_hr, batch_sizes = _extended_args(proj, packed, dtype, requires_grad=True)
    out, h_n, c_n, gates, cells, hidden = ops.lstm_forward(*args, reverse, True, w_hr, batch_sizes)
    ref = reference.lstm_layer(*args, reverse=reverse, w_hr=w_hr, batch_sizes=batch_sizes)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for a, e in zip((out, h_n, c_n), ref):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, **tol)
    rows = out.shape[:-1]
    assert gates.shape == (*rows, 24) and cells.shape == (*rows, 6)
    assert hidden.shape == ((*rows, 6) if proj else (0,))
    inputs = [a for a in (*args, w_hr) if a is not None]
    grads = torch.autograd.grad(out.square().sum() + h_n.sum() + 2 * c_n.sum(), inputs)
    ref_grads = torch.autograd.grad(ref[0].square().sum() + ref[1].sum() + 2 * ref[2].sum(), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj,packed", [(2, False), (0, True), (2, True)])
def test_projection_and_packed_gradcheck(reverse, proj, packed):
    args, w_hr, batch_sizes = _extended_args(proj, packed, requires_grad=True, hidden=3, features=2)
    tensors = (*args, w_hr) if proj else args

    def f(*t):
        out, h_n, c_n, *_ = ops.lstm_forward(
            *t[:7], reverse, True, t[7] if proj else None, batch_sizes
        )
        return out, h_n, c_n

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj,packed", [(3, False), (0, True), (2, True)])
def test_opcheck_projection_and_packed(training, reverse, proj, packed):
    args, w_hr, batch_sizes = _extended_args(proj, packed, requires_grad=training)
    torch.library.opcheck(
        torch.ops.lstm_ext.lstm_forward.default, (*args, reverse, training, w_hr, batch_sizes)
    )
    if training:
        detached = [a.detach() for a in args]
        w_hr = w_hr.detach() if w_hr is not None else None
        out, h_n, c_n, gates, cells, hidden = ops.lstm_forward(
            *detached, reverse, True, w_hr, batch_sizes
        )
        grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
        torch.library.opcheck(
            torch.ops.lstm_ext._lstm_backward.default,
            (
                *grads,
                *detached[:5],
                out,
                gates,
                cells,
                reverse,
                w_hr,
                batch_sizes,
                hidden if w_hr is not None else None,
            ),
        )


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda a: {**a, "w_hr": a["w_hr"][:, :4]},
            r"expected w_hh of shape \[4H, P\] = \[16, 3\], got \[24, 3\]",
        ),
        (lambda a: {**a, "w_hr": a["w_hr"][0]}, r"expected w_hr of shape \[P, H\], got \[6\]"),
        (
            lambda a: {**a, "h0": a["h0"][:, :2]},
            r"expected h0 of shape \[N, P\] = \[4, 3\], got \[4, 2\]",
        ),
        (
            lambda a: {**a, "w_hr": a["w_hr"].float()},
            r"w_hr has dtype Float but input has dtype Double",
        ),
    ],
)
def test_projection_rejects_bad_input(mutate, message):
    (x, h0, c0, w_ih, w_hh, b_ih, b_hh), w_hr, _ = _extended_args(3, packed=False)
    names = ["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr"]
    args = mutate(dict(zip(names, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))))
    with pytest.raises(RuntimeError, match=r"lstm_ext::lstm_forward: " + message):
        torch.ops.lstm_ext.lstm_forward(*(args[n] for n in names[:7]), False, False, args["w_hr"])


@pytest.mark.parametrize(
    "batch_sizes,message",
    [
        (torch.tensor([4, 4, 3, 2, 1]), r"batch_sizes sum to 14 rows but the packed input has 13"),
        (torch.tensor([4, 3, 4, 1, 1]), r"positive and non-increasing, got 4 at step 2 after 3"),
        (torch.tensor([4, 4, 3, 1, 1, 0]), r"positive and non-increasing, got 0 at step 5"),
        (torch.tensor([4, 4, 3, 1, 1], dtype=torch.int32), r"1-D int64 tensor on the CPU"),
        (torch.tensor([], dtype=torch.long), r"at least one step"),
        (torch.tensor([5, 4, 2, 1, 1]), r"expected h0 of shape \[N, H\] = \[5, 6\], got \[4, 6\]"),
    ],
)
def test_packed_rejects_bad_batch_sizes(batch_sizes, message):
    args, _, _ = _extended_args(0, packed=True)
    with pytest.raises(RuntimeError, match=r"lstm_ext::lstm_forward: .*" + message):
        torch.ops.lstm_ext.lstm_forward(*args, False, False, None, batch_sizes)
    with pytest.raises(RuntimeError, match=r"with batch_sizes, expected packed input of shape"):
        torch.ops.lstm_ext.lstm_forward(args[0][None], *args[1:], False, False, None, BATCH_SIZES)


def test_projection_backward_requires_saved_hidden():
    args, w_hr, _ = _extended_args(3, packed=False)
    out, h_n, c_n, gates, cells, hidden = ops.lstm_forward(*args, False, True, w_hr)
    grads = (torch.ones_like(out), torch.zeros_like(h_n), torch.zeros_like(c_n))
    with pytest.raises(RuntimeError, match="saved_hidden from the forward pass is required"):
        torch.ops.lstm_ext._lstm_backward(*grads, *args[:5], out, gates, cells, False, w_hr)


def test_build_info_reports_backends():
    info = lstm_ext.build_info()
    assert "cpu" in info["backends"]
    assert info["cpu_capability"] in ("AVX512", "AVX2", "DEFAULT")
    assert info["version"] == lstm_ext.__version__
