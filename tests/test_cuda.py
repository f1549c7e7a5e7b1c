"""The CUDA kernels: registration (runs without a GPU), then parity, gradients and CUDA semantics.

Registration tests need only a CUDA build of lstm_ext; they skip on a CPU-only build unless
``LSTM_EXT_EXPECT_CUDA=1`` (set by .ci/build_cuda.sh), which turns a silently CPU-only build into a
failure. Every other test needs a GPU and skips cleanly without one.

Shapes: ``T`` time, ``N`` batch, ``C`` input size, ``H`` hidden size.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import lstm_ext
from lstm_ext import ops, reference

EXPECT_CUDA = os.environ.get("LSTM_EXT_EXPECT_CUDA", "0") == "1"
HAS_CUDA_BUILD = bool(lstm_ext._C.with_cuda)
HAS_GPU = torch.cuda.is_available()

needs_cuda_build = pytest.mark.skipif(
    not HAS_CUDA_BUILD and not EXPECT_CUDA, reason="lstm_ext was built without CUDA kernels"
)
needs_gpu = pytest.mark.skipif(
    not (HAS_GPU and HAS_CUDA_BUILD), reason="needs a CUDA GPU and a CUDA build of lstm_ext"
)

TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


def _lstm_ext_ops() -> list[str]:
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lstm_ext::")]
    assert len(names) >= 4, f"lstm_ext's operators are not registered: {names}"
    return sorted(names)


# ----------------------------------------------------------------------------------------------
# Without a GPU: the build and the registrations.


@needs_cuda_build
def test_build_info_reports_cuda():
    info = lstm_ext.build_info()
    assert info["backends"] == ("cpu", "cuda"), info
    assert info["cuda_archs"], info
    expected_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if EXPECT_CUDA and expected_archs:
        assert info["cuda_archs"] == expected_archs, info


@needs_cuda_build
def test_every_op_with_a_cpu_kernel_has_a_cuda_kernel():
    names = _lstm_ext_ops()
    with_cpu = [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
    assert with_cpu, names
    missing = [n for n in with_cpu if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    assert not missing, f"operators with a CPU kernel but no CUDA kernel: {missing}"


@needs_cuda_build
def test_cuda_kernels_are_lstm_ext_ops_only():
    # The CUDA registration targets our own namespace: no CUDA kernel without a CPU twin.
    names = _lstm_ext_ops()
    cuda_only = [
        n
        for n in names
        if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
        and not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")
    ]
    assert not cuda_only, cuda_only


# ----------------------------------------------------------------------------------------------
# With a GPU.


@pytest.fixture
def no_tf32():
    """float32 parity is only meaningful with TF32 GEMMs off, in cuBLAS and in cuDNN."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _assert_close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def _cotangents(outputs, representable_in=None):
    """Fixed random output gradients, the same for every implementation given same-shaped outputs.

    A random linear loss rather than one built from the outputs: each implementation's gradients
    then answer the same question, and none depends on, say, the sign of an output near zero.
    `representable_in` rounds them to a lower precision first, so that a float64 oracle and a
    float16 run start from the very same values.
    """
    generator = torch.Generator().manual_seed(1234)
    cotangents = []
    for o in outputs:
        t = torch.randn(o.shape, generator=generator, dtype=torch.float64)
        if representable_in is not None:
            t = t.to(representable_in)
        cotangents.append(t.to(device=o.device, dtype=o.dtype))
    return cotangents


def _run_with_grads(module, x, hx, forward=None, representable_in=None):
    """Outputs (output, h_n, c_n) and the gradients w.r.t. x, h0, c0 and each parameter."""
    run = forward or module
    output, (h_n, c_n) = run(x, hx) if hx is not None else run(x)
    outputs = (output, h_n, c_n)
    inputs = [x, *(hx or ()), *module.parameters()]
    grads = torch.autograd.grad(outputs, inputs, _cotangents(outputs, representable_in))
    return outputs, grads


def _leaf(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    return t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_()


def _grad_names(module, with_state):
    return [
        "input",
        *(["h_0", "c_0"] if with_state else []),
        *(n for n, _ in module.named_parameters()),
    ]


CONFIGS = [
    # num_layers, bidirectional, batch_first, bias, with_state
    (1, False, False, True, False),
    (1, False, False, True, True),
    (1, True, False, True, True),
    (2, False, True, True, True),
    (2, True, True, False, True),
    (2, True, False, True, False),
]


def _inputs(config, steps=5, batch=3, features=6, hidden=7, dtype=torch.float64):
    num_layers, bidirectional, batch_first, _bias, with_state = config
    directions = 2 if bidirectional else 1
    x = torch.randn(
        (batch, steps, features) if batch_first else (steps, batch, features), dtype=dtype
    )
    hx = None
    if with_state:
        shape = (num_layers * directions, batch, hidden)
        hx = (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
    return x, hx


def _module_kwargs(config, features=6, hidden=7):
    num_layers, bidirectional, batch_first, bias, _ = config
    return dict(
        input_size=features,
        hidden_size=hidden,
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
    )


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_lstm_parity_with_torch_on_cuda(no_tf32, dtype, config):
    kwargs = _module_kwargs(config)
    theirs = torch.nn.LSTM(**kwargs, dtype=dtype, device="cuda")
    ours = lstm_ext.LSTM(**kwargs, dtype=dtype, device="cuda")
    ours.load_state_dict(theirs.state_dict())
    x, hx = _inputs(config, dtype=dtype)
    x, hx = x.cuda(), hx and tuple(t.cuda() for t in hx)

    def leaves():
        return _leaf(x, "cuda"), hx and tuple(_leaf(t, "cuda") for t in hx)

    expected, grads_e = _run_with_grads(theirs, *leaves())
    actual, grads_a = _run_with_grads(ours, *leaves())
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        assert a.shape == e.shape and a.device == e.device, name
        _assert_close(a, e, dtype, name)
    for name, a, e in zip(_grad_names(ours, hx is not None), grads_a, grads_e):
        _assert_close(a, e, dtype, f"grad of {name}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_lstm_cuda_matches_lstm_ext_cpu(no_tf32, dtype, config):
    cpu = lstm_ext.LSTM(**_module_kwargs(config), dtype=dtype)
    gpu = copy.deepcopy(cpu).cuda()
    x, hx = _inputs(config, dtype=dtype)
    expected, grads_e = _run_with_grads(
        cpu, _leaf(x, "cpu"), hx and tuple(_leaf(t, "cpu") for t in hx)
    )
    actual, grads_a = _run_with_grads(
        gpu, _leaf(x, "cuda"), hx and tuple(_leaf(t, "cuda") for t in hx)
    )
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        _assert_close(a.cpu(), e, dtype, name)
    for name, a, e in zip(_grad_names(cpu, hx is not None), grads_a, grads_e):
        _assert_close(a.cpu(), e, dtype, f"grad of {name}")


def _max_error(actual: torch.Tensor, reference_value: torch.Tensor) -> float:
    """Max abs error, relative to the tensor's scale, so that every tensor weighs alike."""
    scale = reference_value.abs().max().clamp_min(1e-30)
    return ((actual.double() - reference_value).abs().max() / scale).item()


def _reference_forward(module: torch.nn.LSTM):
    """The plain-PyTorch reference LSTM run on `module`'s parameters."""

    def forward(input, hx):
        weights = [getattr(module, name) for name in module._flat_weights_names]
        output, h_n, c_n = reference.lstm(
            input,
            hx,
            weights,
            module.bias,
            module.num_layers,
            0.0,
            False,
            module.bidirectional,
            module.batch_first,
        )
        return output, (h_n, c_n)

    return forward


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_low_precision_error_at_most_twice_torch(dtype, bidirectional):
    # Both implementations start from the same rounded weights, inputs and output gradients; each
    # is measured against the float64 reference run on those same values.
    kwargs = dict(input_size=32, hidden_size=64, num_layers=2, bidirectional=bidirectional)
    theirs = torch.nn.LSTM(**kwargs, device="cuda", dtype=dtype)
    ours = lstm_ext.LSTM(**kwargs, device="cuda", dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    exact = torch.nn.LSTM(**kwargs, device="cuda", dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    directions = 2 if bidirectional else 1
    x = torch.randn(16, 8, 32, device="cuda").to(dtype)
    hx = tuple(torch.randn(2 * directions, 8, 64, device="cuda").to(dtype) for _ in range(2))

    def run(module, run_dtype, forward=None):
        leaves = _leaf(x, "cuda", run_dtype), tuple(_leaf(t, "cuda", run_dtype) for t in hx)
        return _run_with_grads(module, *leaves, forward=forward, representable_in=dtype)

    exact_outputs, exact_grads = run(exact, torch.float64, _reference_forward(exact))
    their_outputs, their_grads = run(theirs, dtype)
    our_outputs, our_grads = run(ours, dtype)
    names = ["output", "h_n", "c_n", *(f"grad of {n}" for n in _grad_names(ours, True))]
    failures = []
    for name, ref, t, o in zip(
        names,
        [*exact_outputs, *exact_grads],
        [*their_outputs, *their_grads],
        [*our_outputs, *our_grads],
    ):
        theirs_err, ours_err = _max_error(t, ref), _max_error(o, ref)
        if ours_err > 2 * theirs_err + 1e-12:
            failures.append(f"{name}: lstm_ext {ours_err:.3e} > 2 x torch {theirs_err:.3e}")
    assert not failures, failures


def _layer_args(
    steps=3, batch=2, features=3, hidden=4, bias=True, dtype=torch.float64, requires_grad=False
):
    def make(*shape, scale=1.0):
        t = torch.randn(*shape, dtype=dtype, device="cuda") * scale
        return t.requires_grad_(requires_grad)

    x, h0, c0 = make(steps, batch, features), make(batch, hidden), make(batch, hidden)
    w_ih, w_hh = make(4 * hidden, features, scale=0.5), make(4 * hidden, hidden, scale=0.5)
    b_ih, b_hh = (make(4 * hidden), make(4 * hidden)) if bias else (None, None)
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh


@needs_gpu
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_forward_gradcheck_cuda(reverse, bias):
    args = _layer_args(bias=bias, requires_grad=True)

    def f(*tensors):
        out, h_n, c_n, *_ = ops.lstm_forward(*tensors, reverse=reverse, training=True)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(f, args)


@needs_gpu
def test_lstm_cell_forward_gradcheck_cuda():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _layer_args(steps=1, requires_grad=True)

    def f(*tensors):
        h, c, _ = ops.lstm_cell_forward(*tensors, training=True)
        return h, c

    assert torch.autograd.gradcheck(
        f, (x[0].detach().requires_grad_(), h0, c0, w_ih, w_hh, b_ih, b_hh)
    )


@needs_gpu
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_lstm_forward_cuda(training, reverse):
    args = _layer_args(requires_grad=training)
    torch.library.opcheck(torch.ops.lstm_ext.lstm_forward.default, (*args, reverse, training))


@needs_gpu
def test_opcheck_lstm_backward_cuda():
    args = _layer_args()
    out, h_n, c_n, gates, cells, _ = ops.lstm_forward(*args, reverse=True, training=True)
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(
        torch.ops.lstm_ext._lstm_backward.default, (*grads, *args[:5], out, gates, cells, True)
    )


@needs_gpu
@pytest.mark.parametrize("training", [False, True])
def test_opcheck_lstm_cell_forward_cuda(training):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _layer_args(steps=1, requires_grad=training)
    torch.library.opcheck(
        torch.ops.lstm_ext.lstm_cell_forward.default,
        (x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, training),
    )


@needs_gpu
def test_opcheck_lstm_cell_backward_cuda():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = _layer_args(steps=1)
    h, c, gates = ops.lstm_cell_forward(x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, True)
    args = (torch.randn_like(h), torch.randn_like(c), x[0], h0, c0, w_ih, w_hh, c, gates)
    torch.library.opcheck(torch.ops.lstm_ext._lstm_cell_backward.default, args)


@needs_gpu
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str
)
def test_inference_matches_training_on_cuda(dtype):
    # The two instantiations of the forward kernel (training saves the activated gates) must agree.
    args = _layer_args(steps=4, batch=5, features=6, hidden=9, dtype=dtype)
    inference = ops.lstm_forward(*args, reverse=False, training=False)
    training = ops.lstm_forward(*args, reverse=False, training=True)
    assert inference[3].numel() == 0 and inference[4].numel() == 0
    for a, b in zip(inference[:3], training[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_gpu
def test_grid_stride_loop_covers_more_units_than_threads():
    # The kernels launch at most 4096 blocks of 256 threads (2^20 threads); N x H above that makes
    # every thread walk several units, and an odd H makes the walk wrap across rows.
    args = _layer_args(steps=2, batch=1000, features=4, hidden=1111, requires_grad=True)
    out, h_n, c_n, *_ = ops.lstm_forward(*args, reverse=False, training=True)
    ref_out, ref_h, ref_c = reference.lstm_layer(*args)
    for a, e, name in ((out, ref_out, "output"), (h_n, ref_h, "h_n"), (c_n, ref_c, "c_n")):
        _assert_close(a, e, torch.float64, name)
    grads = torch.autograd.grad(out.square().sum() + h_n.sum() + c_n.sum(), args)
    ref_grads = torch.autograd.grad(ref_out.square().sum() + ref_h.sum() + ref_c.sum(), args)
    for name, a, e in zip(("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"), grads, ref_grads):
        _assert_close(a, e, torch.float64, f"grad of {name}")


@needs_gpu
def test_zero_batch_on_cuda():
    lstm = lstm_ext.LSTM(3, 4, num_layers=2, device="cuda")
    output, (h_n, c_n) = lstm(torch.randn(5, 0, 3, device="cuda"))
    assert output.shape == (5, 0, 4) and h_n.shape == (2, 0, 4) and c_n.shape == (2, 0, 4)


@needs_gpu
def test_non_default_stream_matches_default_stream():
    lstm = lstm_ext.LSTM(
        8, 16, num_layers=2, bidirectional=True, device="cuda", dtype=torch.float64
    )
    x_src = torch.randn(12, 4, 8, device="cuda", dtype=torch.float64)
    expected, grads_e = _run_with_grads(lstm, _leaf(x_src, "cuda"), None)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Delay the side stream: a kernel launched on the default stream instead of the current
        # one would then run ahead of the GEMMs it depends on and read unfinished gates.
        torch.cuda._sleep(50_000_000)
        x = (x_src * 1.0).requires_grad_()
        actual, grads_a = _run_with_grads(lstm, x, None)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        _assert_close(a, e, torch.float64, name)
    for name, a, e in zip(_grad_names(lstm, False), grads_a, grads_e):
        _assert_close(a, e, torch.float64, f"grad of {name}")


@needs_gpu
def test_compile_reduce_overhead_cuda_graphs_matches_eager(no_tf32):
    torch._dynamo.reset()
    lstm = lstm_ext.LSTM(8, 16, num_layers=2, batch_first=True, device="cuda")
    head = torch.nn.Linear(16, 3, device="cuda")

    def model(x):
        output, (h_n, _) = lstm(x)
        return head(output[:, -1]) + h_n.sum()

    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, 10, 8, device="cuda")
    with torch.no_grad():
        expected = model(x)
        # CUDA graph trees record on a later call than the first; run enough calls to replay.
        for _ in range(4):
            actual = compiled(x).clone()
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    params = [*lstm.parameters(), *head.parameters()]
    xg = x.clone().requires_grad_()
    grads_e = torch.autograd.grad(model(xg).sum(), [xg, *params])
    for _ in range(4):
        xg = x.clone().requires_grad_()
        out = compiled(xg)
        grads_a = [g.clone() for g in torch.autograd.grad(out.sum(), [xg, *params])]
    for a, e in zip(grads_a, grads_e):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_cell_parity_on_cuda(no_tf32, dtype, bias):
    theirs = torch.nn.LSTMCell(5, 11, bias=bias, dtype=dtype, device="cuda")
    ours = lstm_ext.LSTMCell(5, 11, bias=bias, dtype=dtype, device="cuda")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 5, dtype=dtype, device="cuda")
    hx = (
        torch.randn(4, 11, dtype=dtype, device="cuda"),
        torch.randn(4, 11, dtype=dtype, device="cuda"),
    )

    def run(cell):
        xs, hs = _leaf(x, "cuda"), tuple(_leaf(t, "cuda") for t in hx)
        h, c = cell(xs, hs)
        grads = torch.autograd.grad(h.square().sum() + 3 * c.sum(), [xs, *hs, *cell.parameters()])
        return (h, c), grads

    expected, grads_e = run(theirs)
    actual, grads_a = run(ours)
    for name, a, e in zip(("h", "c"), actual, expected):
        _assert_close(a, e, dtype, name)
    names = ["input", "h", "c", *(n for n, _ in ours.named_parameters())]
    for name, a, e in zip(names, grads_a, grads_e):
        _assert_close(a, e, dtype, f"grad of {name}")


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the point is to capture whatever torch raises
        return error
    raise AssertionError("expected an exception")


@needs_gpu
def test_cpu_input_to_cuda_lstm_raises_like_torch():
    theirs = torch.nn.LSTM(3, 4, num_layers=2, device="cuda")
    ours = lstm_ext.LSTM(3, 4, num_layers=2, device="cuda")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3)
    expected, actual = _raised(lambda: theirs(x)), _raised(lambda: ours(x))
    assert type(actual) is type(expected)
    assert str(actual) == str(expected)


@needs_gpu
def test_cpu_input_to_cuda_lstm_cell_raises_like_torch():
    theirs = torch.nn.LSTMCell(3, 4, device="cuda")
    ours = lstm_ext.LSTMCell(3, 4, device="cuda")
    x = torch.randn(2, 3)
    expected, actual = _raised(lambda: theirs(x)), _raised(lambda: ours(x))
    assert type(actual) is type(expected)
    # ATen's message may carry a suffix naming the failing kernel argument; the sentence must match.
    assert str(expected).startswith(str(actual).split("!")[0]), (str(actual), str(expected))


@needs_gpu
def test_op_with_tensors_on_two_devices_is_rejected_with_a_message():
    # Dispatch picks the CUDA kernel when any argument is on CUDA; the device guard must not
    # preempt the op's own device check.
    args = list(_layer_args())
    args[0] = args[0].cpu()
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        ops.lstm_forward(*args, reverse=False, training=False)


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_a_non_current_device():
    lstm = lstm_ext.LSTM(3, 4, device="cuda:1", dtype=torch.float64)
    x = torch.randn(5, 2, 3, device="cuda:1", dtype=torch.float64)
    with torch.cuda.device(0):
        output, _ = lstm(x)
    expected, _ = copy.deepcopy(lstm).cpu()(x.cpu())
    _assert_close(output.cpu(), expected, torch.float64, "output on cuda:1")


# ----------------------------------------------------------------------------------------------
# Projections, packed batches and autocast on CUDA.

PROJ_PACKED_CASES = [
    # proj_size, lengths (None: padded), enforce_sorted
    (3, None, True),
    (0, [5, 5, 2, 1], True),
    (0, [2, 5, 1, 4], False),
    (2, [3, 5, 5, 1], False),
]


def _packed_run(module, padded, hx, lengths, enforce_sorted):
    """Outputs (output data, h_n, c_n) and the gradients of padded, hx and every parameter."""
    from torch.nn.utils.rnn import pack_padded_sequence

    x = padded if lengths is None else pack_padded_sequence(
        padded, lengths, enforce_sorted=enforce_sorted)
    output, (h_n, c_n) = module(x, hx)
    outputs = (output if lengths is None else output.data, h_n, c_n)
    inputs = [padded, *hx, *module.parameters()]
    return outputs, torch.autograd.grad(outputs, inputs, _cotangents(outputs))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("proj,lengths,enforce_sorted", PROJ_PACKED_CASES, ids=str)
def test_projections_and_packed_on_cuda_match_torch_on_cpu(no_tf32, dtype, proj, lengths,
                                                           enforce_sorted):
    kwargs = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, proj_size=proj)
    theirs = torch.nn.LSTM(**kwargs, dtype=dtype)
    ours = lstm_ext.LSTM.from_torch(theirs).cuda()
    padded = torch.randn(5, 4, 4, dtype=dtype)
    hx = (torch.randn(4, 4, proj or 6, dtype=dtype), torch.randn(4, 4, 6, dtype=dtype))
    expected, grads_e = _packed_run(theirs, _leaf(padded, "cpu"),
                                    tuple(_leaf(t, "cpu") for t in hx), lengths, enforce_sorted)
    actual, grads_a = _packed_run(ours, _leaf(padded, "cuda"),
                                  tuple(_leaf(t, "cuda") for t in hx), lengths, enforce_sorted)
    for i, (a, e) in enumerate(zip([*actual, *grads_a], [*expected, *grads_e])):
        assert a.device.type == "cuda"
        _assert_close(a.cpu(), e, dtype, f"result {i}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("proj,lengths,enforce_sorted", PROJ_PACKED_CASES, ids=str)
def test_cuda_autocast_dtypes_match_torch(dtype, proj, lengths, enforce_sorted):
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    theirs = torch.nn.LSTM(4, 6, num_layers=2, proj_size=proj, device="cuda")
    ours = lstm_ext.LSTM.from_torch(theirs)
    padded = torch.randn(5, 4, 4, device="cuda")
    x = padded if lengths is None else pack_padded_sequence(
        padded, lengths, enforce_sorted=enforce_sorted)
    with torch.autocast("cuda", dtype=dtype):
        results = [module(x) for module in (theirs, ours)]
    flat = [[o.data if isinstance(o, PackedSequence) else o, h, c] for o, (h, c) in results]
    assert [t.dtype for t in flat[1]] == [t.dtype for t in flat[0]]
    for a, e in zip(flat[1], flat[0]):
        torch.testing.assert_close(a.float(), e.float(), rtol=0.05, atol=0.05)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_lstm_cell_dtypes_match_torch(dtype):
    theirs = torch.nn.LSTMCell(4, 6, device="cuda")
    ours = lstm_ext.LSTMCell.from_torch(theirs)
    x = torch.randn(3, 4, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        expected, actual = theirs(x), ours(x)
    assert [t.dtype for t in actual] == [t.dtype for t in expected]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.float(), e.float(), rtol=0.05, atol=0.05)


@needs_gpu
def test_double_backward_on_cuda_matches_torch_on_cpu():
    # cuDNN's LSTM has no double backward, so torch's CPU native path is the comparison.
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = lstm_ext.LSTM.from_torch(theirs).cuda()

    def penalty_grads(module, device):
        x = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        x = x.to(device).requires_grad_()
        wrt = [x, *module.parameters()]
        out, (h_n, c_n) = module(x)
        first = torch.autograd.grad((out**2).sum() + c_n.sum(), wrt, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in first), wrt)

    for a, e in zip(penalty_grads(ours, "cuda"), penalty_grads(theirs, "cpu")):
        _assert_close(a.cpu(), e, torch.float64, "second-order gradient on CUDA")


@needs_gpu
def test_gradgradcheck_on_cuda():
    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, device="cuda", requires_grad=True)

    args = (make(3, 2, 2), make(2, 3), make(2, 3), make(12, 2), make(12, 3), make(12), make(12))

    def f(*tensors):
        out, h_n, c_n, *_ = torch.ops.lstm_ext.lstm_forward(*tensors, False, True)
        return out, h_n, c_n

    assert torch.autograd.gradgradcheck(f, args)


@needs_gpu
def test_vmap_and_per_sample_gradients_on_cuda_match_cpu(no_tf32):
    cpu = lstm_ext.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    gpu = copy.deepcopy(cpu).cuda()
    xs = torch.randn(4, 5, 2, 3, dtype=torch.float64)

    def per_sample(module, samples):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, x):
            return torch.func.functional_call(module, p, (x,))[0].pow(2).sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, samples)

    expected, actual = per_sample(cpu, xs), per_sample(gpu, xs.cuda())
    for name in expected:
        _assert_close(actual[name].cpu(), expected[name], torch.float64, f"per-sample {name}")
    with torch.no_grad():
        out = torch.func.vmap(lambda x: gpu(x)[0])(xs.cuda())
        _assert_close(out.cpu(), torch.func.vmap(lambda x: cpu(x)[0])(xs), torch.float64, "vmap")


# ----------------------------------------------------------------------------------------------
# The other cells on CUDA: the GRU and every LSTM variant (their kernels share the loop; the
# layer-norm step runs one block per row with block-wide sums), against lstm_ext on the CPU.

OTHER_CELLS = {
    "gru-2layers-bidir": lambda dtype: lstm_ext.GRU(5, 33, 2, bidirectional=True, dtype=dtype),
    "peephole-coupled": lambda dtype: lstm_ext.LSTM(5, 33, peephole=True, coupled_gates=True,
                                                    dtype=dtype),
    "zoneout": lambda dtype: lstm_ext.LSTM(5, 33, 2, zoneout=0.3, dtype=dtype),
    "layer_norm-bidir": lambda dtype: lstm_ext.LSTM(5, 33, bidirectional=True, layer_norm=True,
                                                    dtype=dtype),
    # H = 300: the layer-norm kernels' threads each take more than one unit of a row.
    "layer_norm-all-H300": lambda dtype: lstm_ext.LSTM(
        5, 300, peephole=True, coupled_gates=True, layer_norm=True, zoneout=0.2, dtype=dtype),
}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("make", OTHER_CELLS.values(), ids=OTHER_CELLS.keys())
def test_other_cells_cuda_match_lstm_ext_cpu(no_tf32, make, packed, dtype):
    torch.manual_seed(0)
    cpu = make(dtype)
    if getattr(cpu, "variant", None) is not None and cpu.variant.zoneout > 0:
        # Training draws zoneout's masks from the input's device's generator, so the CPU and the
        # GPU would draw different ones: compare eval's expectation here, and the masks' path
        # through the op below.
        cpu.eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(6, 4, 5, dtype=dtype)
    lengths = [6, 3, 5, 1]

    def run(module, device):
        leaf = x.to(device).requires_grad_()
        given = (torch.nn.utils.rnn.pack_padded_sequence(leaf, lengths, enforce_sorted=False)
                 if packed else leaf)
        output, state = module(given)
        output = output.data if packed else output
        states = state if isinstance(state, tuple) else (state,)
        loss = sum((t * torch.linspace(-1, 1, t.numel(), device=device, dtype=dtype).view_as(t))
                   .sum() for t in (output, *states))
        return [output, *states, *torch.autograd.grad(loss, [leaf, *module.parameters()])]

    names = ["output", "state", "state2", "input"] + [n for n, _ in cpu.named_parameters()]
    for name, a, e in zip(names, run(gpu, "cuda"), run(cpu, "cpu")):
        tolerance = TOLERANCES[dtype] if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
        torch.testing.assert_close(a.cpu(), e, **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@needs_gpu
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_lstm_layernorm_ops_cuda(training):
    hidden, gates = 6, 24
    dev = {"device": "cuda", "dtype": torch.float64}
    input_part = torch.randn(4, 3, gates, **dev)
    args = (input_part, torch.randn(3, hidden, **dev), torch.randn(3, hidden, **dev),
            torch.randn(gates, hidden, **dev), torch.rand(gates, **dev) + 0.5,
            torch.rand(hidden, **dev) + 0.5, torch.randn(hidden, **dev),
            torch.randn(3, hidden, **dev), False, False, training, None, None, None, 0.2)
    torch.library.opcheck(torch.ops.lstm_ext.lstm_layernorm_forward.default, args)
    if training:
        out, h_n, c_n, *saved = ops.lstm_layernorm_forward(*args)
        torch.library.opcheck(
            torch.ops.lstm_ext._lstm_layernorm_backward.default,
            (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), *args[1:9],
             out, *saved, False, None, None, None, 0.2),
        )


@needs_gpu
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_layernorm_op_with_zoneout_masks_cuda_matches_cpu(packed):
    torch.manual_seed(0)
    hidden, gates, batch = 40, 120, 3  # coupled gates: 3H
    f64 = torch.float64
    batch_sizes = torch.tensor([3, 3, 2, 1]) if packed else None
    rows = 9 if packed else 12
    shape = (rows,) if packed else (4, batch)
    mask_h, mask_c = reference.zoneout_masks(rows, hidden, 0.3, dtype=f64)
    tensors = [torch.randn(*shape, gates, dtype=f64), torch.randn(batch, hidden, dtype=f64),
               torch.randn(batch, hidden, dtype=f64), torch.randn(gates, hidden, dtype=f64) / 6,
               torch.rand(gates, dtype=f64) + 0.5, torch.rand(hidden, dtype=f64) + 0.5,
               torch.randn(hidden, dtype=f64), torch.randn(3, hidden, dtype=f64),
               mask_h.view(*shape, hidden), mask_c.view(*shape, hidden)]

    def run(device):
        t = [a.to(device).requires_grad_(i < 8) for i, a in enumerate(tensors)]
        out, h, c, *_ = ops.apply_lstm_layernorm_layer(
            *t[:8], True, None if batch_sizes is None else batch_sizes, False, t[8], t[9], 0.0)
        loss = out.square().sum() + h.sum() + c.square().sum()
        return [out, h, c, *torch.autograd.grad(loss, t[:8])]

    for index, (a, e) in enumerate(zip(run("cuda"), run("cpu"))):
        torch.testing.assert_close(a.cpu(), e, **TOLERANCES[f64],
                                   msg=lambda m, i=index: f"output/gradient {i}: {m}")
