"""The oracle for cells without a fused kernel: lstm_ext.reference's GRU against torch.nn.GRU and
GRUCell, its LSTM variants against ONNX Runtime's LSTM operator and a hand-written step loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from torch.nn.utils.rnn import pack_padded_sequence

from lstm_ext import reference

f64 = torch.float64


def _randn(*shape: int, dtype: torch.dtype = f64, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _assert_all_close(actual, expected, dtype: torch.dtype = f64) -> None:
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, **TOLERANCES[dtype], msg=lambda m, i=index: f"#{i}: {m}")


def _assert_all_equal(actual, expected) -> None:
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(a, e), f"#{index} differs by {(a - e).abs().max()}"


def _grads(outputs, inputs) -> tuple[torch.Tensor, ...]:
    """Gradients of a loss that weighs every output differently.

    The graph is kept: the two sides compared may share part of it (a pack_padded_sequence).
    """
    loss = sum((out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view_as(out)).sum()
               for out in outputs)
    return torch.autograd.grad(loss, inputs, retain_graph=True)


# --- GRU ------------------------------------------------------------------------------------

GRU_CONFIGS = {
    "1 layer": dict(num_layers=1),
    "2 layers bidirectional": dict(num_layers=2, bidirectional=True),
    "no bias": dict(num_layers=2, bidirectional=True, bias=False),
    "batch_first": dict(num_layers=1, batch_first=True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", GRU_CONFIGS.values(), ids=GRU_CONFIGS.keys())
def test_gru_matches_torch(config, dtype):
    gru = torch.nn.GRU(5, 6, **config, dtype=dtype)
    directions = 2 if gru.bidirectional else 1
    x = _randn(*((3, 4, 5) if gru.batch_first else (4, 3, 5)), dtype=dtype, grad=True)
    h0 = _randn(gru.num_layers * directions, 3, 6, dtype=dtype, grad=True)
    expected = gru(x, h0)
    actual = reference.gru(
        x, h0, gru._flat_weights, gru.bias, gru.num_layers, 0.0, False, gru.bidirectional,
        gru.batch_first,
    )
    _assert_all_close(actual, expected, dtype)
    inputs = [x, h0, *gru._flat_weights]
    _assert_all_close(_grads(actual, inputs), _grads(expected, inputs), dtype)


def test_gru_packed_matches_torch():
    gru = torch.nn.GRU(5, 6, 2, bidirectional=True, dtype=f64)
    x = _randn(5, 4, 5, grad=True)
    h0 = _randn(4, 4, 6, grad=True)
    # Unsorted lengths: torch.nn.GRU sorts the batch; the reference, like torch._VF.gru, takes
    # the sorted one, so permute h0 into it and h_n back out of it here.
    sequence = pack_padded_sequence(x, [2, 5, 1, 4], enforce_sorted=False)
    output, h_n = gru(sequence, h0)
    ref_output, ref_h = reference.gru(
        sequence.data, h0[:, sequence.sorted_indices], gru._flat_weights, True, 2, 0.0, False,
        True, False, batch_sizes=sequence.batch_sizes,
    )
    actual = (ref_output, ref_h[:, sequence.unsorted_indices])
    _assert_all_close(actual, (output.data, h_n))
    inputs = [x, h0, *gru._flat_weights]
    _assert_all_close(_grads(actual, inputs), _grads((output.data, h_n), inputs))


@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell_matches_torch(bias):
    cell = torch.nn.GRUCell(5, 6, bias=bias, dtype=f64)
    x, hx = _randn(3, 5, grad=True), _randn(3, 6, grad=True)
    expected = cell(x, hx)
    actual = reference.gru_cell(x, hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    _assert_all_close([actual], [expected])
    inputs = [x, hx, *cell.parameters()]
    _assert_all_close(_grads([actual], inputs), _grads([expected], inputs))


def test_gru_layer_packed_reverse_gradcheck():
    batch_sizes = torch.tensor([3, 2, 1])
    inputs = (_randn(6, 2, grad=True), _randn(3, 2, grad=True), _randn(6, 2, grad=True),
              _randn(6, 2, grad=True), _randn(6, grad=True), _randn(6, grad=True))

    def layer(x, h0, w_ih, w_hh, b_ih, b_hh):
        return reference.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, reverse=True,
                                   batch_sizes=batch_sizes)

    assert torch.autograd.gradcheck(layer, inputs)


# --- LSTM variants: the hand-written loop ---------------------------------------------------


def _layer_norm_params(gates: int, hidden: int, grad: bool = False) -> dict[str, torch.Tensor]:
    return {
        "weight_ih": (1 + 0.3 * _randn(gates * hidden)).requires_grad_(grad),
        "weight_hh": (1 + 0.3 * _randn(gates * hidden)).requires_grad_(grad),
        "weight_c": (1 + 0.3 * _randn(hidden)).requires_grad_(grad),
        "bias_c": (0.3 * _randn(hidden)).requires_grad_(grad),
    }


def _variant_weights(C: int, H: int, coupled: bool, grad: bool = False) -> list[torch.Tensor]:
    G = 3 if coupled else 4
    return [_randn(G * H, C, grad=grad), _randn(G * H, H, grad=grad), _randn(G * H, grad=grad),
            _randn(G * H, grad=grad)]


def _loop(x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole=None, coupled=False, layer_norm=None,
          keep=None, w_hr=None):
    """The documented formulas step by step for a padded batch, nothing hoisted.

    keep: None, a float (eval zoneout), or (mask_h, mask_c) each ``[T, N, H]``.
    """
    H = c0.size(1)
    h, c, outputs = h0, c0, []
    for t in range(x.size(0)):
        x_part, h_part = x[t] @ w_ih.T, h @ w_hh.T
        if layer_norm is not None:
            x_part = F.layer_norm(x_part, (x_part.size(1),), layer_norm["weight_ih"])
            h_part = F.layer_norm(h_part, (h_part.size(1),), layer_norm["weight_hh"])
        pre = x_part + h_part + b_ih + b_hh
        pre_i, pre_g, pre_o = (pre[:, k * H:(k + 1) * H] for k in ((0, 1, 2) if coupled
                                                                   else (0, 2, 3)))
        w_ci, w_cf, w_co = peephole if peephole is not None else torch.zeros(3, H, dtype=x.dtype)
        i = torch.sigmoid(pre_i + w_ci * c)
        f = 1 - i if coupled else torch.sigmoid(pre[:, H:2 * H] + w_cf * c)
        c_new = f * c + i * torch.tanh(pre_g)
        o = torch.sigmoid(pre_o + w_co * c_new)
        c_out = c_new if layer_norm is None else F.layer_norm(
            c_new, (H,), layer_norm["weight_c"], layer_norm["bias_c"])
        h_new = o * torch.tanh(c_out)
        if w_hr is not None:
            h_new = h_new @ w_hr.T
        if keep is None:
            h, c = h_new, c_new
        else:
            k_h, k_c = (keep, keep) if isinstance(keep, float) else (keep[0][t], keep[1][t])
            h, c = k_h * h + (1 - k_h) * h_new, k_c * c + (1 - k_c) * c_new
        outputs.append(h)
    return torch.stack(outputs), h, c


ZONEOUT_MODES = ["off", "eval", "train"]


@pytest.mark.parametrize("zoneout", ZONEOUT_MODES)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["", "layer_norm"])
@pytest.mark.parametrize("coupled", [False, True], ids=["", "coupled"])
@pytest.mark.parametrize("peephole", [False, True], ids=["", "peephole"])
def test_variant_layer_matches_loop(peephole, coupled, layer_norm, zoneout):
    T, N, C, H = 4, 3, 5, 6
    x, h0, c0 = _randn(T, N, C), _randn(N, H), _randn(N, H)
    weights = _variant_weights(C, H, coupled)
    options = dict(
        peephole=_randn(3, H) if peephole else None,
        coupled_gates=coupled,
        layer_norm=_layer_norm_params(3 if coupled else 4, H) if layer_norm else None,
    )
    masks = reference.zoneout_masks(T * N, H, 0.4, dtype=f64)
    zoneout_options = {
        "off": {},
        "eval": dict(zoneout=0.4),
        "train": dict(zoneout=0.4, training=True, zoneout_masks=masks),
    }[zoneout]
    keep = {"off": None, "eval": 0.4,
            "train": tuple(mask.view(T, N, H) for mask in masks)}[zoneout]
    actual = reference.lstm_variant_layer(x, h0, c0, *weights, **options, **zoneout_options)
    expected = _loop(x, h0, c0, *weights, peephole=options["peephole"], coupled=coupled,
                     layer_norm=options["layer_norm"], keep=keep)
    _assert_all_close(actual, expected)
    # One step of the layer is the cell, to the last bit.
    if zoneout == "train":
        zoneout_options["zoneout_masks"] = tuple(mask[:N] for mask in masks)
    step = reference.lstm_variant_layer(x[:1], h0, c0, *weights, **options, **zoneout_options)
    cell = reference.lstm_variant_cell(x[0], (h0, c0), *weights, **options, **zoneout_options)
    _assert_all_equal(cell, step[1:])


def test_layer_norm_gradcheck():
    x, h0, c0 = _randn(3, 2, 3, grad=True), _randn(2, 2, grad=True), _randn(2, 2, grad=True)
    weights = _variant_weights(3, 2, coupled=False, grad=True)
    ln = _layer_norm_params(4, 2, grad=True)

    def layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *gains):
        return reference.lstm_variant_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                            layer_norm=dict(zip(ln, gains)))

    assert torch.autograd.gradcheck(layer, (x, h0, c0, *weights, *ln.values()))


def test_all_options_gradcheck():
    """Peephole, coupled gates, layer norm and eval zoneout together, packed and reversed."""
    batch_sizes = torch.tensor([2, 2, 1])
    x, h0, c0 = _randn(5, 3, grad=True), _randn(2, 2, grad=True), _randn(2, 2, grad=True)
    weights = _variant_weights(3, 2, coupled=True, grad=True)
    peephole = _randn(3, 2, grad=True)
    ln = _layer_norm_params(3, 2, grad=True)

    def layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, *gains):
        return reference.lstm_variant_layer(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse=True, batch_sizes=batch_sizes,
            peephole=peephole, coupled_gates=True, layer_norm=dict(zip(ln, gains)),
            zoneout=0.3,
        )

    assert torch.autograd.gradcheck(layer, (x, h0, c0, *weights, peephole, *ln.values()))


def test_peephole_with_projections_matches_loop():
    x, h0, c0 = _randn(4, 3, 5), _randn(3, 2), _randn(3, 6)
    weights = [_randn(24, 5), _randn(24, 2), _randn(24), _randn(24)]
    peephole, w_hr = _randn(3, 6), _randn(2, 6)
    actual = reference.lstm_variant_layer(x, h0, c0, *weights, w_hr=w_hr, peephole=peephole)
    _assert_all_close(actual, _loop(x, h0, c0, *weights, peephole=peephole, w_hr=w_hr))


# --- LSTM variants: with every option off it is lstm_layer ----------------------------------


@pytest.mark.parametrize("projections", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_variant_layer_without_options_is_lstm_layer(packed, reverse, projections):
    P = 3 if projections else 6
    batch_sizes = torch.tensor([4, 3, 3, 1]) if packed else None
    x = _randn(11, 5, grad=True) if packed else _randn(4, 4, 5, grad=True)
    h0, c0 = _randn(4, P, grad=True), _randn(4, 6, grad=True)
    weights = [_randn(24, 5, grad=True), _randn(24, P, grad=True), _randn(24, grad=True),
               _randn(24, grad=True)]
    w_hr = _randn(3, 6, grad=True) if projections else None
    inputs = [x, h0, c0, *weights] + ([w_hr] if projections else [])
    expected = reference.lstm_layer(x, h0, c0, *weights, reverse=reverse, w_hr=w_hr,
                                    batch_sizes=batch_sizes)
    actual = reference.lstm_variant_layer(x, h0, c0, *weights, reverse=reverse, w_hr=w_hr,
                                          batch_sizes=batch_sizes)
    _assert_all_equal(actual, expected)
    _assert_all_equal(_grads(actual, inputs), _grads(expected, inputs))


def test_variant_cell_without_options_is_lstm_cell():
    x, hx = _randn(3, 5), (_randn(3, 6), _randn(3, 6))
    weights = _variant_weights(5, 6, coupled=False)
    _assert_all_close(reference.lstm_variant_cell(x, hx, *weights),
                      reference.lstm_cell(x, hx, *weights))
    _assert_all_close(reference.lstm_variant_cell(x, hx, *weights[:2]),
                      reference.lstm_cell(x, hx, *weights[:2]))


# --- LSTM variants: against ONNX Runtime's LSTM operator ------------------------------------


def _onnx_gates(rows: torch.Tensor, forget: torch.Tensor | None) -> torch.Tensor:
    """Our gate rows (i, f, g, o, or i, g, o and a stand-in forget) in ONNX's order i, o, f, c."""
    if forget is None:
        i, f, g, o = rows.chunk(4)
    else:
        (i, g, o), f = rows.chunk(3), forget
    return torch.cat([i, o, f, g])


def _run_onnx_lstm(feeds: dict[str, torch.Tensor], hidden: int, direction: str,
                   input_forget: bool) -> list[torch.Tensor]:
    """A single-node model of ONNX's LSTM (opset 14) run in ONNX Runtime: (Y, Y_h, Y_c)."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    names = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    graph_inputs = [
        onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.INT32 if name == "sequence_lens" else onnx.TensorProto.FLOAT,
            list(feeds[name].shape))
        for name in names if name in feeds
    ]
    node = onnx.helper.make_node(
        "LSTM", [name if name in feeds else "" for name in names], ["Y", "Y_h", "Y_c"],
        hidden_size=hidden, direction=direction, input_forget=int(input_forget),
    )
    outputs = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
               for name in ("Y", "Y_h", "Y_c")]
    model = onnx.helper.make_model(
        onnx.helper.make_graph([node], "lstm", graph_inputs, outputs),
        opset_imports=[onnx.helper.make_opsetid("", 14)],
    )
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    results = session.run(None, {name: tensor.numpy() for name, tensor in feeds.items()})
    return [torch.from_numpy(result) for result in results]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("gates", ["peephole", "coupled", "peephole+coupled"])
def test_variant_matches_onnx_runtime(gates, direction, packed):
    T, N, C, H = 5, 4, 3, 6
    peephole = _randn(3, H, dtype=torch.float32) if "peephole" in gates else None
    coupled = "coupled" in gates
    x = _randn(T, N, C, dtype=torch.float32)
    h0, c0 = _randn(N, H, dtype=torch.float32), _randn(N, H, dtype=torch.float32)
    w_ih, w_hh, b_ih, b_hh = (w.float() for w in _variant_weights(C, H, coupled))
    # ORT's input_forget=1 (checked by running onnxruntime 1.32): f = 1 - i, i with its
    # peephole, as ours; it ignores the forget rows of W, R, B and P's forget row, which ONNX's
    # shapes still require. Random ones here, so that a use of them would show.
    forget = [_randn(H, *shape, dtype=torch.float32) if coupled else None
              for shape in ((C,), (H,), (), ())]
    feeds = {
        "X": x,
        "W": _onnx_gates(w_ih, forget[0])[None],
        "R": _onnx_gates(w_hh, forget[1])[None],
        "B": torch.cat([_onnx_gates(b_ih, forget[2]), _onnx_gates(b_hh, forget[3])])[None],
        "initial_h": h0[None],
        "initial_c": c0[None],
    }
    if peephole is not None:
        w_ci, w_cf, w_co = peephole
        feeds["P"] = torch.cat([w_ci, w_co, w_cf])[None]
    lengths = [5, 4, 2, 1]
    if packed:
        # ONNX's sequence_lens: each sequence runs its own length, reversed from its own end.
        feeds["sequence_lens"] = torch.tensor(lengths, dtype=torch.int32)
    y, y_h, y_c = _run_onnx_lstm(feeds, H, direction, coupled)
    options = dict(reverse=direction == "reverse", peephole=peephole, coupled_gates=coupled)
    if packed:
        sequence = pack_padded_sequence(x, lengths)
        output, h_n, c_n = reference.lstm_variant_layer(
            sequence.data, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_sizes=sequence.batch_sizes,
            **options)
        expected_output = pack_padded_sequence(y[:, 0], lengths).data
    else:
        output, h_n, c_n = reference.lstm_variant_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                        **options)
        expected_output = y[:, 0]
    _assert_all_close((output, h_n, c_n), (expected_output, y_h[0], y_c[0]), torch.float32)


# --- zoneout --------------------------------------------------------------------------------


def test_zoneout_eval_is_the_expectation():
    T, N, C, H, p = 4, 3, 5, 6, 0.3
    x, h0, c0 = _randn(T, N, C), _randn(N, H), _randn(N, H)
    weights = _variant_weights(C, H, coupled=False)
    h, c, outputs = h0, c0, []
    for t in range(T):
        h_new, c_new = reference.lstm_cell(x[t], (h, c), *weights)
        h, c = p * h + (1 - p) * h_new, p * c + (1 - p) * c_new
        outputs.append(h)
    expected = (torch.stack(outputs), h, c)
    _assert_all_close(reference.lstm_variant_layer(x, h0, c0, *weights, zoneout=p), expected)
    # The same at training=False whatever the seed: nothing is drawn.
    torch.manual_seed(1)
    _assert_all_close(
        reference.lstm_variant_layer(x, h0, c0, *weights, zoneout=p, training=False), expected)


def test_zoneout_masks_of_zeros_and_ones():
    T, N, C, H = 4, 3, 5, 6
    x, h0, c0 = _randn(T, N, C), _randn(N, H), _randn(N, H)
    weights = _variant_weights(C, H, coupled=False)
    zeros = (torch.zeros(T * N, H, dtype=f64),) * 2
    ones = (torch.ones(T * N, H, dtype=f64),) * 2
    plain = reference.lstm_variant_layer(x, h0, c0, *weights)
    _assert_all_equal(reference.lstm_variant_layer(
        x, h0, c0, *weights, zoneout=0.5, training=True, zoneout_masks=zeros), plain)
    output, h_n, c_n = reference.lstm_variant_layer(
        x, h0, c0, *weights, zoneout=0.5, training=True, zoneout_masks=ones)
    _assert_all_equal((output, h_n, c_n), (h0.expand(T, N, H), h0, c0))


@pytest.mark.parametrize("reverse", [False, True])
def test_zoneout_packed_masks_follow_the_rows(reverse):
    """A packed batch with training masks (and every other option) is each sequence run alone
    with the mask rows of its own steps."""
    H, C, lengths = 4, 3, [4, 3, 1]
    batch_sizes = torch.tensor([3, 2, 2, 1])
    x = _randn(int(batch_sizes.sum()), C)
    h0, c0 = _randn(3, H), _randn(3, H)
    weights = _variant_weights(C, H, coupled=True)
    options = dict(peephole=_randn(3, H), coupled_gates=True, layer_norm=_layer_norm_params(3, H),
                   zoneout=0.5, training=True, reverse=reverse)
    masks = reference.zoneout_masks(x.size(0), H, 0.5, dtype=f64)
    output, h_n, c_n = reference.lstm_variant_layer(
        x, h0, c0, *weights, batch_sizes=batch_sizes, zoneout_masks=masks, **options)
    starts = torch.cumsum(batch_sizes, 0) - batch_sizes
    for b, length in enumerate(lengths):
        rows = starts[:length] + b
        alone = reference.lstm_variant_layer(
            x[rows, None], h0[b:b + 1], c0[b:b + 1], *weights,
            zoneout_masks=tuple(mask[rows] for mask in masks), **options)
        _assert_all_close((output[rows], h_n[b], c_n[b]), (alone[0][:, 0], alone[1][0],
                                                            alone[2][0]))


def test_zoneout_masks_are_reproducible():
    torch.manual_seed(3)
    mask_h, mask_c = reference.zoneout_masks(20, 7, 0.4)
    torch.manual_seed(3)
    probability = torch.full((20, 7), 0.4)
    assert torch.equal(mask_h, torch.bernoulli(probability))
    assert torch.equal(mask_c, torch.bernoulli(probability))
    generator = torch.Generator().manual_seed(5)
    first = reference.zoneout_masks(20, 7, 0.4, generator=generator, dtype=f64)
    generator.manual_seed(5)
    _assert_all_equal(reference.zoneout_masks(20, 7, 0.4, generator=generator, dtype=f64), first)
    assert first[0].dtype == f64


def test_zoneout_masks_mean_is_p():
    for mask in reference.zoneout_masks(1000, 100, 0.3):
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        # 1e5 draws: the mean's standard deviation is 1.4e-3.
        assert abs(mask.mean().item() - 0.3) < 0.01
    assert not torch.equal(*reference.zoneout_masks(1000, 100, 0.3))


def test_zoneout_training_draws_with_zoneout_masks():
    T, N, C, H = 4, 3, 5, 6
    x, h0, c0 = _randn(T, N, C), _randn(N, H), _randn(N, H)
    weights = _variant_weights(C, H, coupled=False)
    torch.manual_seed(7)
    drawn = reference.lstm_variant_layer(x, h0, c0, *weights, zoneout=0.4, training=True)
    torch.manual_seed(7)
    masks = reference.zoneout_masks(T * N, H, 0.4, dtype=f64)
    _assert_all_equal(drawn, reference.lstm_variant_layer(
        x, h0, c0, *weights, zoneout=0.4, training=True, zoneout_masks=masks))
    assert not torch.equal(drawn[0], reference.lstm_variant_layer(x, h0, c0, *weights)[0])
    # p = 0 draws nothing and changes nothing.
    _assert_all_equal(reference.lstm_variant_layer(x, h0, c0, *weights, training=True),
                      reference.lstm_variant_layer(x, h0, c0, *weights))


# --- bad arguments --------------------------------------------------------------------------


def _ones_layer_norm(gates: int, hidden: int) -> dict[str, torch.Tensor]:
    return {"weight_ih": torch.ones(gates * hidden), "weight_hh": torch.ones(4 * hidden),
            "weight_c": torch.ones(hidden), "bias_c": torch.ones(hidden)}


# For a layer of hidden size 6 over T = 2, N = 4, C = 5: rows = 8, 4H = 24.
BAD_ARGUMENTS = {
    "peephole [H]": (dict(peephole=torch.zeros(6)), r"peephole must be \[3, H\] = \[3, 6\]"),
    "peephole [4, H]": (dict(peephole=torch.zeros(4, 6)), "peephole must be"),
    "zoneout 1": (dict(zoneout=1.0), r"zoneout must be a probability in \[0, 1\)"),
    "zoneout < 0": (dict(zoneout=-0.1), "zoneout must be"),
    "coupled with 4H rows": (dict(coupled_gates=True), "w_ih must have 3.H = 18 rows"),
    "4H with 3H rows": (dict(w_ih=torch.zeros(18, 5)), "w_ih must have 4.H = 24 rows"),
    "layer_norm missing keys": (dict(layer_norm={"weight_ih": torch.ones(24)}),
                                "layer_norm must have the keys"),
    "layer_norm shape": (dict(layer_norm=_ones_layer_norm(3, 6)),
                         r"layer_norm\['weight_ih'\] must be \[24\]"),
    "masks in eval": (dict(zoneout=0.5, zoneout_masks=(torch.ones(8, 6),) * 2),
                      "zoneout_masks are for training"),
    "masks shape": (dict(zoneout=0.5, training=True, zoneout_masks=(torch.ones(2, 6),) * 2),
                    r"mask_h must be \[rows, H\] = \[8, 6\]"),
    "w_hr with zoneout": (dict(w_hr=torch.zeros(6, 6), zoneout=0.1),
                          "with peephole and coupled_gates only, not with zoneout"),
    "w_hr with layer norm and zoneout": (dict(w_hr=torch.zeros(6, 6), zoneout=0.1,
                                              layer_norm=_ones_layer_norm(4, 6)),
                                         "not with layer_norm and zoneout"),
}


@pytest.mark.parametrize("bad, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_variant_bad_arguments(bad, message):
    arguments = dict(input=torch.zeros(2, 4, 5), h0=torch.zeros(4, 6), c0=torch.zeros(4, 6),
                     w_ih=torch.zeros(24, 5), w_hh=torch.zeros(24, 6))
    arguments.update(bad)
    with pytest.raises(ValueError, match=message):
        reference.lstm_variant_layer(**arguments)


def test_zoneout_masks_bad_p():
    with pytest.raises(ValueError, match="zoneout must be"):
        reference.zoneout_masks(2, 3, 1.5)
