"""lstm_ext.LSTM / LSTMCell against torch.nn.LSTM / LSTMCell: outputs and every gradient."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import assert_close, paired_lstms
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_ext

DTYPES = [torch.float64, torch.float32]


def _run(module, x, hx):
    output, (h_n, c_n) = module(x, hx) if hx is not None else module(x)
    return output, h_n, c_n


def _loss(output, h_n, c_n):
    # Distinct weights per output so that a gradient routed to the wrong place shows.
    return output.square().sum() + (2 * h_n).sum() + (c_n * c_n.detach().sign()).sum()


def _check_parity(dtype, input_shape, hx_shape, with_state, **config):
    theirs, ours = paired_lstms(dtype, **config)
    x = torch.randn(input_shape, dtype=dtype, requires_grad=True)
    hx = None
    if with_state:
        hx = (
            torch.randn(hx_shape, dtype=dtype, requires_grad=True),
            torch.randn(hx_shape, dtype=dtype, requires_grad=True),
        )
    expected = _run(theirs, x, hx)
    actual = _run(ours, x, hx)
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        assert a.shape == e.shape, name
        assert_close(a, e, dtype, name)

    inputs_t = [x, *(hx or ()), *theirs.parameters()]
    inputs_o = [x, *(hx or ()), *ours.parameters()]
    names = ["input", *(["h_0", "c_0"] if hx else []), *(n for n, _ in ours.named_parameters())]
    grads_e = torch.autograd.grad(_loss(*expected), inputs_t)
    grads_a = torch.autograd.grad(_loss(*actual), inputs_o)
    for name, a, e in zip(names, grads_a, grads_e):
        assert_close(a, e, dtype, f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "num_layers,bidirectional,batch_first,bias,with_state",
    [
        (1, False, False, True, False),
        (1, False, False, True, True),
        (1, True, False, True, True),
        (2, False, True, True, True),
        (2, True, True, False, True),
        (3, True, False, True, False),
        (3, False, False, False, True),
        (2, True, False, True, True),
    ],
)
def test_lstm_parity(dtype, num_layers, bidirectional, batch_first, bias, with_state):
    steps, batch, features, hidden = 5, 3, 6, 7
    directions = 2 if bidirectional else 1
    shape = (batch, steps, features) if batch_first else (steps, batch, features)
    _check_parity(
        dtype,
        shape,
        (num_layers * directions, batch, hidden),
        with_state,
        input_size=features,
        hidden_size=hidden,
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 8, 13, 16, 37])
def test_lstm_parity_sizes_around_simd_width(dtype, hidden):
    # 8 floats / 4 doubles per AVX2 vector: these sizes exercise the vector body and the scalar
    # tail.
    _check_parity(
        dtype, (4, 5, 3), (2, 5, hidden), True, input_size=3, hidden_size=hidden, bidirectional=True
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("steps,batch", [(1, 3), (6, 1), (1, 1)])
def test_lstm_parity_short_and_single(dtype, steps, batch):
    _check_parity(
        dtype, (steps, batch, 4), (2, batch, 9), True, input_size=4, hidden_size=9, num_layers=2
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_unbatched(dtype, batch_first, with_state):
    _check_parity(
        dtype,
        (5, 4),
        (4, 6),
        with_state,
        input_size=4,
        hidden_size=6,
        num_layers=2,
        bidirectional=True,
        batch_first=batch_first,
    )


def test_lstm_zero_batch():
    theirs, ours = paired_lstms(torch.float64, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 0, 3, dtype=torch.float64)
    expected = _run(theirs, x, None)
    actual = _run(ours, x, None)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape


def test_lstm_in_inference_mode_and_no_grad():
    theirs, ours = paired_lstms(torch.float64, input_size=3, hidden_size=5)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    expected = _run(theirs, x, None)
    for context in (torch.no_grad(), torch.inference_mode()):
        with context:
            actual = _run(ours, x, None)
        for a, e in zip(actual, expected):
            assert_close(a, e, torch.float64, "inference")
            assert a.grad_fn is None


def test_lstm_dropout_between_layers():
    theirs, ours = paired_lstms(
        torch.float64, input_size=3, hidden_size=5, num_layers=3, dropout=0.5
    )
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    # eval(): dropout off, exact parity.
    theirs.eval()
    ours.eval()
    assert_close(ours(x)[0], theirs(x)[0], torch.float64, "eval output")
    # train(): dropout on. Same seed -> same masks as torch's native path (same dropout calls in
    # the same order), and a different seed gives a different output.
    theirs.train()
    ours.train()
    with torch.backends.mkldnn.flags(enabled=False):
        torch.manual_seed(123)
        expected = theirs(x)[0]
    torch.manual_seed(123)
    actual = ours(x)[0]
    assert_close(actual, expected, torch.float64, "train output with dropout")
    torch.manual_seed(124)
    assert not torch.allclose(ours(x)[0], actual)


def test_lstm_single_layer_dropout_warns_like_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        lstm_ext.LSTM(3, 4, dropout=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_lstm_cell_parity(dtype, bias, batched, with_state):
    theirs = torch.nn.LSTMCell(5, 11, bias=bias, dtype=dtype)
    ours = lstm_ext.LSTMCell(5, 11, bias=bias, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn((4, 5) if batched else (5,), dtype=dtype, requires_grad=True)
    state_shape = (4, 11) if batched else (11,)
    hx = None
    if with_state:
        hx = (
            torch.randn(state_shape, dtype=dtype, requires_grad=True),
            torch.randn(state_shape, dtype=dtype, requires_grad=True),
        )
    expected = theirs(x, hx)
    actual = ours(x, hx)
    for name, a, e in zip(("h", "c"), actual, expected):
        assert a.shape == e.shape
        assert_close(a, e, dtype, name)
    inputs_t = [x, *(hx or ()), *theirs.parameters()]
    inputs_o = [x, *(hx or ()), *ours.parameters()]
    grads_e = torch.autograd.grad(expected[0].square().sum() + 3 * expected[1].sum(), inputs_t)
    grads_a = torch.autograd.grad(actual[0].square().sum() + 3 * actual[1].sum(), inputs_o)
    for a, e in zip(grads_a, grads_e):
        assert_close(a, e, dtype, "cell gradient")


def test_lstm_cell_unrolled_sequence_matches_lstm():
    # LSTMCell stepped over a sequence is one LSTM layer: gradients flow through the cell op chain.
    cell = lstm_ext.LSTMCell(3, 6).double()
    lstm = torch.nn.LSTM(3, 6).double()
    with torch.no_grad():
        for suffix in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(lstm, f"{suffix}_l0").copy_(getattr(cell, suffix))
    x = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    h = c = torch.zeros(2, 6, dtype=torch.float64)
    outs = []
    for x_t in x.unbind(0):
        h, c = cell(x_t, (h, c))
        outs.append(h)
    ours = torch.stack(outs)
    theirs = lstm(x)[0]
    assert_close(ours, theirs, torch.float64, "unrolled output")
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    assert_close(g_ours, g_theirs, torch.float64, "unrolled input gradient")


def test_state_dict_round_trip_and_init():
    config = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, bias=True)
    torch.manual_seed(7)
    theirs = torch.nn.LSTM(**config)
    torch.manual_seed(7)
    ours = lstm_ext.LSTM(**config)
    # Same names, shapes and initialization (same RNG draws in the same order).
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    # Both directions, no conversion.
    other = torch.nn.LSTM(**config)
    other.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    cell_theirs, cell_ours = torch.nn.LSTMCell(3, 5), lstm_ext.LSTMCell(3, 5)
    cell_theirs.load_state_dict(cell_ours.state_dict())
    assert list(cell_ours.state_dict()) == list(cell_theirs.state_dict())


def test_repr_and_deepcopy_like_torch():
    ours = lstm_ext.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
    theirs = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
    assert repr(ours) == repr(theirs)
    assert repr(lstm_ext.LSTMCell(3, 5, bias=False)) == repr(torch.nn.LSTMCell(3, 5, bias=False))
    clone = copy.deepcopy(ours)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(clone(x)[0], ours(x)[0], rtol=0, atol=0)


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_modules_run_lstm_ext_operators_not_torch_lstm():
    lstm = lstm_ext.LSTM(3, 4, num_layers=2, bidirectional=True)
    cell = lstm_ext.LSTMCell(3, 4)
    x = torch.randn(5, 2, 3, requires_grad=True)
    with _OpRecorder() as recorder:
        output, (h_n, c_n) = lstm(x)
        h, c = cell(x[0])
        (output.sum() + h.sum()).backward()
    ops = recorder.ops
    assert ops.count("lstm_ext.lstm_forward.default") == 4  # 2 layers x 2 directions
    assert ops.count("lstm_ext._lstm_backward.default") == 4
    assert ops.count("lstm_ext.lstm_cell_forward.default") == 1
    assert ops.count("lstm_ext._lstm_cell_backward.default") == 1
    assert not [op for op in ops if "lstm" in op and not op.startswith("lstm_ext.")], ops


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = torch.nn.Sequential()
    lstm = lstm_ext.LSTM(4, 8, num_layers=2, batch_first=True)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = lstm
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            output, (h_n, _) = self.lstm(x)
            return self.head(output[:, -1]) + h_n.sum()

    model = Model()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 6, 4, requires_grad=True)
    eager_out = model(x)
    compiled_out = compiled(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    eager_grads = torch.autograd.grad(eager_out.sum(), [x, *model.parameters()])
    compiled_grads = torch.autograd.grad(compiled_out.sum(), [x, *model.parameters()])
    for a, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_grad_only_for_some_inputs():
    # Only h_n used, weights frozen: the unused outputs' gradients are absent (not materialized).
    theirs, ours = paired_lstms(torch.float64, input_size=3, hidden_size=4, num_layers=2)
    for p in itertools.chain(theirs.parameters(), ours.parameters()):
        p.requires_grad_(False)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    (g_t,) = torch.autograd.grad(theirs(x)[1][0].sum(), x)
    (g_o,) = torch.autograd.grad(ours(x)[1][0].sum(), x)
    assert_close(g_o, g_t, torch.float64, "grad through h_n only")


def test_parametrized_and_pruned_weights_are_the_ones_used():
    # The module reads each weight as it is at call time (lstm_ext.modules._current_weights):
    # a parametrization replaces the parameter with a property, pruning with a plain attribute,
    # and neither leaves it in _parameters under its own name.
    from torch.nn.utils import parametrize, prune

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.manual_seed(0)
    theirs = torch.nn.LSTM(5, 7, num_layers=2)
    ours = lstm_ext.LSTM.from_torch(theirs)
    x = torch.randn(3, 2, 5)
    before = ours(x)[0].detach()
    for module in (theirs, ours):
        parametrize.register_parametrization(module, "weight_hh_l0", Doubled())
        prune.l1_unstructured(module, "weight_ih_l1", amount=0.5)
    expected, actual = theirs(x)[0], ours(x)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(actual, before, atol=1e-3)
