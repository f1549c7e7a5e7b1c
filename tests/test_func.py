"""torch.func on lstm_ext.LSTM / LSTMCell: grad, vjp, jacrev, vmap, per-sample gradients, ensembles.

Each result is compared with the same computation done with torch.nn.LSTM (LSTMCell) in a Python
loop, or with ordinary autograd on it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, paired_lstms
from torch.func import functional_call, grad, jacrev, stack_module_state, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_ext

D = torch.float64


class _CountOps(TorchDispatchMode):
    """Counts the lstm_ext operator calls that reach the kernels (below vmap and autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("lstm_ext."):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


def _assert_dicts_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], D, f"{what} {name}")


CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True),
    dict(proj_size=2, batch_first=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_grad_over_parameters_matches_autograd_on_torch(config):
    theirs, ours = paired_lstms(D, input_size=3, hidden_size=4, **config)
    x = torch.randn(2, 5, 3, dtype=D)

    def loss(module):
        return lambda params: (functional_call(module, params, (x,))[0] ** 2).sum()

    actual = grad(loss(ours))(_params(ours))
    expected = dict(
        zip(
            _params(theirs),
            torch.autograd.grad((theirs(x)[0] ** 2).sum(), list(theirs.parameters())),
        )
    )
    _assert_dicts_close(actual, expected, "torch.func.grad")


def test_vjp_matches_autograd_on_torch():
    theirs, ours = paired_lstms(D, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=D)
    h0, c0 = torch.randn(2, 2, 4, dtype=D), torch.randn(2, 2, 4, dtype=D)
    (out, h_n, c_n), vjp_fn = vjp(lambda a, b, c: _flat(ours(a, (b, c))), x, h0, c0)
    cotangents = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    actual = vjp_fn(cotangents)
    inputs = [t.clone().requires_grad_() for t in (x, h0, c0)]
    expected = torch.autograd.grad(
        _flat(theirs(inputs[0], (inputs[1], inputs[2]))), inputs, cotangents
    )
    for a, e in zip(actual, expected):
        assert_close(a, e, D, "torch.func.vjp")


def _flat(result):
    out, (h_n, c_n) = result
    return out, h_n, c_n


@pytest.mark.parametrize("wrt", ["input", "h0", "weights"])
def test_jacrev_matches_torch(wrt):
    theirs, ours = paired_lstms(D, input_size=2, hidden_size=3, bidirectional=True)
    x = torch.randn(4, 2, 2, dtype=D)
    h0, c0 = torch.randn(2, 2, 3, dtype=D), torch.randn(2, 2, 3, dtype=D)
    if wrt == "input":

        def f(module):
            return lambda a: module(a, (h0, c0))[0]

        arg = x
    elif wrt == "h0":

        def f(module):
            return lambda a: module(x, (a, c0))[1][1]

        arg = h0
    else:

        def f(module):
            return lambda w: functional_call(module, {"weight_hh_l0": w}, (x, (h0, c0)))[0]

        arg = ours.weight_hh_l0.detach()
    actual = jacrev(f(ours))(arg)
    expected = torch.autograd.functional.jacobian(f(theirs), arg)
    assert_close(actual, expected, D, f"jacrev wrt {wrt}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
@pytest.mark.parametrize("with_state", [False, True])
def test_vmap_over_a_batch_of_inputs_is_one_fused_call(config, with_state):
    theirs, ours = paired_lstms(D, input_size=3, hidden_size=4, **config)
    ours.eval()
    samples = torch.randn(6, 2, 5, 3, dtype=D)  # 6 samples of [N=2, T=5, C] or [T=2, N=5, C]
    layers = ours.num_layers * (2 if ours.bidirectional else 1)
    batch = 5 if not ours.batch_first else 2
    states = (
        torch.randn(6, layers, batch, ours.proj_size or 4, dtype=D),
        torch.randn(6, layers, batch, 4, dtype=D),
    )

    def run(module):
        if with_state:
            return lambda x, h, c: _flat(module(x, (h, c)))
        return lambda x: _flat(module(x))

    args = (samples, *states) if with_state else (samples,)
    with torch.no_grad(), _CountOps() as counter:
        actual = vmap(run(ours))(*args)
    expected = [torch.stack(o) for o in zip(*(run(theirs)(*a) for a in zip(*args)))]
    for a, e in zip(actual, expected):
        assert_close(a, e, D, "vmap over inputs")
    # One op call per layer and direction for all six samples together.
    assert counter.counts == {"lstm_ext.lstm_forward.default": layers}


def test_vmap_forward_then_ordinary_backward():
    # vmap inside, ordinary autograd outside: parameter gradients equal a loop over samples.
    theirs, ours = paired_lstms(D, input_size=3, hidden_size=4, num_layers=2)
    samples = torch.randn(3, 5, 2, 3, dtype=D)
    (vmap(lambda x: ours(x)[0])(samples) ** 2).sum().backward()
    sum((theirs(x)[0] ** 2).sum() for x in samples).backward()
    for (name, a), e in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(a.grad, e.grad, D, f"gradient of {name}")


@pytest.mark.parametrize("unbatched", [True, False])
def test_per_sample_gradients_match_a_loop_over_torch(unbatched):
    theirs, ours = paired_lstms(D, input_size=3, hidden_size=4, num_layers=2, batch_first=True)
    linear = torch.nn.Linear(4, 1, dtype=D)
    xs = torch.randn(5, 6, 3, dtype=D) if unbatched else torch.randn(5, 1, 6, 3, dtype=D)
    ys = torch.randn(5, 1, dtype=D)

    def loss(module):
        def f(params, x, y):
            out, _ = functional_call(module, params, (x,))
            return ((linear(out[..., -1, :]).reshape(-1) - y) ** 2).sum()

        return f

    actual = vmap(grad(loss(ours)), in_dims=(None, 0, 0))(_params(ours), xs, ys)
    per_sample = [grad(loss(theirs))(_params(theirs), x, y) for x, y in zip(xs, ys)]
    expected = {name: torch.stack([g[name] for g in per_sample]) for name in per_sample[0]}
    _assert_dicts_close(actual, expected, "per-sample gradient")


def test_ensemble_with_stacked_parameters_matches_separate_models():
    models = [lstm_ext.LSTM(3, 4, num_layers=2, dtype=D).eval() for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 2, 3, dtype=D)

    def run(p, b, inp):
        return _flat(functional_call(base, (p, b), (inp,)))

    with torch.no_grad():
        actual = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for k, model in enumerate(models):
        theirs = model.to_torch()
        with torch.no_grad():
            expected = _flat(theirs(x))
        for a, e in zip(actual, expected):
            assert_close(a[k], e, D, f"ensemble member {k}")


def test_ensemble_gradients_match_separate_models():
    models = [lstm_ext.LSTM(3, 4, dtype=D) for _ in range(2)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 2, 3, dtype=D)

    def loss(p, b):
        return functional_call(base, (p, b), (x,))[0].square().sum()

    actual = vmap(grad(loss), in_dims=(0, 0))(params, buffers)
    for k, model in enumerate(models):
        theirs = model.to_torch()
        expected = torch.autograd.grad(theirs(x)[0].square().sum(), list(theirs.parameters()))
        for (name, _), e in zip(theirs.named_parameters(), expected):
            assert_close(actual[name][k], e, D, f"ensemble member {k} gradient {name}")


def test_vmap_packed_input_matches_a_loop():
    theirs, ours = paired_lstms(D, input_size=3, hidden_size=4)
    batch_sizes = torch.tensor([2, 2, 1])
    data = torch.randn(4, 5, 3, dtype=D)  # 4 samples, each a packed [rows=5, C]

    def run(module):
        def f(d):
            out, (h_n, c_n) = module(torch.nn.utils.rnn.PackedSequence(d, batch_sizes))
            return out.data, h_n, c_n

        return f

    with torch.no_grad():
        actual = vmap(run(ours))(data)
        expected = [torch.stack(o) for o in zip(*(run(theirs)(d) for d in data))]
    for a, e in zip(actual, expected):
        assert_close(a, e, D, "vmap over packed input")


def test_lstm_cell_under_torch_func():
    theirs = torch.nn.LSTMCell(3, 4, dtype=D)
    ours = lstm_ext.LSTMCell.from_torch(theirs)
    xs = torch.randn(5, 2, 3, dtype=D)
    states = (torch.randn(5, 2, 4, dtype=D), torch.randn(5, 2, 4, dtype=D))
    with torch.no_grad(), _CountOps() as counter:
        h, c = vmap(lambda x, a, b: ours(x, (a, b)))(xs, *states)
    assert counter.counts == {"lstm_ext.lstm_cell_forward.default": 1}
    for k in range(5):
        eh, ec = theirs(xs[k], (states[0][k], states[1][k]))
        assert_close(h[k], eh, D, "vmap LSTMCell h")
        assert_close(c[k], ec, D, "vmap LSTMCell c")

    def loss(module):
        return lambda p, x: functional_call(module, p, (x,))[0].pow(2).sum()

    actual = vmap(grad(loss(ours)), in_dims=(None, 0))(_params(ours), xs)
    per_sample = [grad(loss(theirs))(_params(theirs), x) for x in xs]
    expected = {name: torch.stack([g[name] for g in per_sample]) for name in per_sample[0]}
    _assert_dicts_close(actual, expected, "LSTMCell per-sample gradient")
    jac = jacrev(lambda x: ours(x)[1])(xs[0])
    assert_close(
        jac, torch.autograd.functional.jacobian(lambda x: theirs(x)[1], xs[0]), D, "LSTMCell jacrev"
    )


def test_grad_of_grad_under_torch_func():
    # torch.func composes with the differentiable backward: a second derivative through grad.
    theirs, ours = paired_lstms(D, input_size=2, hidden_size=3)
    x = torch.randn(3, 2, 2, dtype=D)

    def second(module):
        def inner(a):
            return grad(lambda b: module(b)[0].pow(2).sum())(a).pow(2).sum()

        return grad(inner)(x)

    assert_close(second(ours), second(theirs), D, "grad of grad")


def test_float32_vmap_matches_unbatched_calls():
    lstm = lstm_ext.LSTM(5, 7, num_layers=2).eval()
    samples = torch.randn(4, 6, 3, 5)
    with torch.no_grad():
        actual = vmap(lambda x: lstm(x)[0])(samples)
        expected = torch.stack([lstm(x)[0] for x in samples])
    assert_close(actual, expected, torch.float32, "float32 vmap")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(c) or "default")
def test_forward_mode_jvp_and_jacfwd_match_torch(config):
    theirs, ours = paired_lstms(D, input_size=2, hidden_size=3, **config)
    x = torch.randn(3, 2, 2, dtype=D)
    tangent = torch.randn_like(x)
    (out, h_n, c_n), tangents = torch.func.jvp(lambda a: _flat(ours(a)), (x,), (tangent,))
    expected_out, expected_tangents = torch.autograd.functional.jvp(
        lambda a: _flat(theirs(a)), x, tangent
    )
    for a, e in zip((out, h_n, c_n, *tangents), (*expected_out, *expected_tangents)):
        assert_close(a, e, D, "torch.func.jvp")
    jac = torch.func.jacfwd(lambda a: ours(a)[1][1])(x)
    assert_close(jac, torch.autograd.functional.jacobian(lambda a: theirs(a)[1][1], x), D, "jacfwd")


def test_dual_tensors_of_torch_autograd_forward_ad():
    import torch.autograd.forward_ad as fwAD

    theirs, ours = paired_lstms(D, input_size=2, hidden_size=3, num_layers=2)
    x, tangent = torch.randn(3, 2, 2, dtype=D), torch.randn(3, 2, 2, dtype=D)
    results = []
    for module in (ours, theirs):
        with fwAD.dual_level():
            out, (h_n, _) = module(fwAD.make_dual(x, tangent))
            results.append([fwAD.unpack_dual(t).tangent for t in (out, h_n)])
    for a, e in zip(*results):
        assert_close(a, e, D, "forward-mode tangent")


def test_hessian_matches_torch():
    # torch.func.hessian is jacfwd(jacrev): forward mode over the differentiable backward.
    theirs, ours = paired_lstms(D, input_size=2, hidden_size=3, bidirectional=True)
    x = torch.randn(3, 2, 2, dtype=D)

    def loss(module):
        return lambda a: (module(a)[0] ** 2).sum()

    expected = torch.autograd.functional.hessian(loss(theirs), x)
    assert_close(torch.func.hessian(loss(ours))(x), expected, D, "hessian")
    assert_close(jacrev(jacrev(loss(ours)))(x), expected, D, "jacrev(jacrev)")


def test_lstm_cell_forward_mode_and_hessian_match_torch():
    theirs = torch.nn.LSTMCell(2, 3, dtype=D)
    ours = lstm_ext.LSTMCell.from_torch(theirs)
    x = torch.randn(2, 2, dtype=D)
    tangent = torch.randn_like(x)
    _, actual = torch.func.jvp(lambda a: ours(a), (x,), (tangent,))
    _, expected = torch.autograd.functional.jvp(lambda a: theirs(a), x, tangent)
    for a, e in zip(actual, expected):
        assert_close(a, e, D, "LSTMCell jvp")

    def loss(module):
        return lambda a: module(a)[1].pow(2).sum()

    expected = torch.autograd.functional.hessian(loss(theirs), x)
    assert_close(torch.func.hessian(loss(ours))(x), expected, D, "LSTMCell hessian")


def test_forward_mode_with_frozen_parameters_and_under_no_grad():
    # Nothing requires grad here, so the functional layer would take the raw inference op, whose
    # outputs carry no tangent: torch.func.jvp would return zeros. Forward mode must be detected.
    import torch.autograd.forward_ad as fwAD

    theirs, ours = paired_lstms(D, input_size=2, hidden_size=3, num_layers=2)
    cell_theirs = torch.nn.LSTMCell(2, 3, dtype=D)
    cell_ours = lstm_ext.LSTMCell.from_torch(cell_theirs)
    for module in (theirs, ours, cell_theirs, cell_ours):
        module.requires_grad_(False)
    x, tangent = torch.randn(3, 2, 2, dtype=D), torch.randn(3, 2, 2, dtype=D)
    for mine, reference, sample, direction in (
        (ours, theirs, x, tangent),
        (cell_ours, cell_theirs, x[0], tangent[0]),
    ):
        _, actual = torch.func.jvp(lambda a, m=mine: m(a)[0], (sample,), (direction,))
        _, expected = torch.func.jvp(lambda a, m=reference: m(a)[0], (sample,), (direction,))
        assert expected.abs().max() > 0
        assert_close(actual, expected, D, "jvp with frozen parameters")
        results = []
        for module in (mine, reference):
            with torch.no_grad(), fwAD.dual_level():
                out = module(fwAD.make_dual(sample, direction))[0]
                results.append(fwAD.unpack_dual(out).tangent)
        assert results[0] is not None
        assert_close(results[0], results[1], D, "dual tangent under no_grad")
