"""ONNX export of lstm_ext.LSTM / LSTMCell with both torch.onnx exporters, run in onnxruntime.

Every exported graph must hold ONNX's own LSTM operator and no lstm_ext node, and compute what
eager lstm_ext computes (float32). onnx, onnxscript and onnxruntime are optional dependencies:
without them this file is skipped.
"""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import assert_close
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_ext

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the optional package onnx")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs the optional onnxscript")
ort = pytest.importorskip(
    "onnxruntime", reason="ONNX export tests run the exported model in the optional onnxruntime"
)

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]
STEPS, BATCH, FEATURES, HIDDEN = 5, 3, 6, 7


def _export(model: torch.nn.Module, args: tuple, dynamo: bool, **kwargs) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation warning, its tracer's warnings about the
        # modules' shape checks, the dynamo exporter's notes: none is about lstm_ext's graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, dynamo=dynamo, verbose=False, **kwargs)
    return buffer.getvalue()


def _assert_standard_lstm_graph(model_bytes: bytes, lstm_nodes: int) -> None:
    model = onnx.load_from_string(model_bytes)
    nodes = list(model.graph.node)
    assert [n.op_type for n in nodes].count("LSTM") == lstm_nodes
    assert all(n.domain in ("", "ai.onnx") for n in nodes), [(n.op_type, n.domain) for n in nodes]
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert not model.functions
    onnx.checker.check_model(model)


def _run_onnx(model_bytes: bytes, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs)
    outputs = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})
    return [torch.from_numpy(o) for o in outputs]


def _assert_outputs(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected)
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        assert a.shape == e.shape, f"{what} {name}: {a.shape} vs {e.shape}"
        assert_close(a, e.detach(), torch.float32, f"{what} {name}")


def _lstm_inputs(
    num_layers: int, bidirectional: bool, batch_first: bool, with_state: bool,
    steps: int = STEPS, batch: int = BATCH,
) -> tuple:
    shape = (batch, steps, FEATURES) if batch_first else (steps, batch, FEATURES)
    x = torch.randn(shape)
    if not with_state:
        return (x,)
    states = (num_layers * (2 if bidirectional else 1), batch, HIDDEN)
    return (x, (torch.randn(states), torch.randn(states)))


def _flat(args: tuple) -> list[torch.Tensor]:
    return [args[0], *args[1]] if len(args) > 1 else [args[0]]


def _eager(model: torch.nn.Module, args: tuple) -> list[torch.Tensor]:
    output, (h_n, c_n) = model(*args)
    return [output, h_n, c_n]


LSTM_CONFIGS = [
    pytest.param(1, False, False, True, False, id="1layer"),
    pytest.param(1, True, True, False, False, id="1layer-bidir-batch_first-nobias"),
    pytest.param(2, False, True, False, True, id="2layers-batch_first-nobias-state"),
    pytest.param(2, True, False, True, True, id="2layers-bidir-state"),
]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias,with_state", LSTM_CONFIGS)
def test_lstm_export_matches_eager(dynamo, num_layers, bidirectional, batch_first, bias,
                                   with_state):
    model = lstm_ext.LSTM(
        FEATURES, HIDDEN, num_layers=num_layers, bias=bias, batch_first=batch_first,
        bidirectional=bidirectional, dropout=0.25 if num_layers > 1 else 0.0,
    ).eval()  # eval: no dropout between layers, as for any export
    args = _lstm_inputs(num_layers, bidirectional, batch_first, with_state)
    model_bytes = _export(model, args, dynamo)
    # One ONNX LSTM node per layer and direction.
    _assert_standard_lstm_graph(model_bytes, num_layers * (2 if bidirectional else 1))
    _assert_outputs(_run_onnx(model_bytes, _flat(args)), _eager(model, args), "LSTM")


@pytest.mark.parametrize("opset", [11, 13])
def test_torchscript_export_at_older_opsets(opset):
    # Squeeze/Unsqueeze take their axes as an attribute before opset 13, as an input from 13.
    model = lstm_ext.LSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True).eval()
    cell = lstm_ext.LSTMCell(FEATURES, HIDDEN).eval()
    args = _lstm_inputs(2, True, False, True)
    model_bytes = _export(model, args, False, opset_version=opset)
    _assert_standard_lstm_graph(model_bytes, 4)
    _assert_outputs(_run_onnx(model_bytes, _flat(args)), _eager(model, args), f"opset {opset}")
    x = torch.randn(BATCH, FEATURES)
    model_bytes = _export(cell, (x,), False, opset_version=opset)
    _assert_standard_lstm_graph(model_bytes, 1)
    for a, e in zip(_run_onnx(model_bytes, [x]), cell(x)):
        assert_close(a, e.detach(), torch.float32, f"LSTMCell at opset {opset}")


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_lstm_export_with_dynamic_time_and_batch(dynamo):
    model = lstm_ext.LSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True).eval()
    args = _lstm_inputs(2, True, False, True)
    if dynamo:
        steps, batch = Dim("T"), Dim("N")
        options = dict(dynamic_shapes=({0: steps, 1: batch}, ({1: batch}, {1: batch})))
    else:
        options = dict(
            input_names=["input", "h_0", "c_0"],
            output_names=["output", "h_n", "c_n"],
            dynamic_axes={"input": {0: "T", 1: "N"}, "h_0": {1: "N"}, "c_0": {1: "N"},
                          "output": {0: "T", 1: "N"}, "h_n": {1: "N"}, "c_n": {1: "N"}},
        )
    model_bytes = _export(model, args, dynamo, **options)
    _assert_standard_lstm_graph(model_bytes, 4)
    # Run at a sequence length and batch other than the exported ones.
    other = _lstm_inputs(2, True, False, True, steps=STEPS + 2, batch=BATCH - 1)
    _assert_outputs(_run_onnx(model_bytes, _flat(other)), _eager(model, other), "dynamic")


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("bias,with_state", [(True, True), (False, False)])
def test_lstm_cell_export_matches_eager(dynamo, bias, with_state):
    cell = lstm_ext.LSTMCell(FEATURES, HIDDEN, bias=bias).eval()
    x = torch.randn(BATCH, FEATURES)
    args = (x, (torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN))) if with_state else (x,)
    model_bytes = _export(cell, args, dynamo)
    _assert_standard_lstm_graph(model_bytes, 1)
    actual = _run_onnx(model_bytes, _flat(args))
    for name, a, e in zip(("h", "c"), actual, cell(*args)):
        assert_close(a, e.detach(), torch.float32, f"LSTMCell {name}")


@pytest.mark.parametrize("grad", [True, False], ids=["training_op", "inference_op"])
def test_translation_table_for_an_exported_program(grad):
    # torch.export.export runs the fused operators (with training=True when the parameters
    # require grad); the table translates them whatever that flag.
    table = lstm_ext.onnx.custom_translation_table()
    assert set(table) == {
        torch.ops.lstm_ext.lstm_forward.default,
        torch.ops.lstm_ext.lstm_cell_forward.default,
        torch.ops.lstm_ext.lstm_variant_forward.default,
        torch.ops.lstm_ext.lstm_layernorm_forward.default,
        torch.ops.lstm_ext.gru_forward.default,
        torch.ops.lstm_ext.gru_cell_forward.default,
    }
    model = lstm_ext.LSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True).eval()
    cell = lstm_ext.LSTMCell(FEATURES, HIDDEN).eval()
    args = _lstm_inputs(2, True, False, True)
    cell_args = (torch.randn(BATCH, FEATURES),
                 (torch.randn(BATCH, HIDDEN), torch.randn(BATCH, HIDDEN)))
    for module, module_args, nodes in ((model, args, 4), (cell, cell_args, 1)):
        with torch.set_grad_enabled(grad):
            program = torch.export.export(module, module_args)
        targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
        assert targets & set(table), "the program should hold lstm_ext's operators"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program, custom_translation_table=table, verbose=False
            )
        model_bytes = onnx_program.model_proto.SerializeToString()
        _assert_standard_lstm_graph(model_bytes, nodes)
        actual = _run_onnx(model_bytes, _flat(module_args))
        expected = module(*module_args)
        expected = _eager(module, module_args) if module is model else list(expected)
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e.detach(), torch.float32, f"{type(module).__name__} output {index}")


# --- LSTM variants: peepholes are ONNX LSTM's P input, coupled gates its input_forget=1 --------

VARIANTS = [
    pytest.param(dict(peephole=True), id="peephole"),
    pytest.param(dict(coupled_gates=True), id="coupled"),
    pytest.param(dict(peephole=True, coupled_gates=True), id="peephole+coupled"),
]


def _assert_variant_nodes(model_bytes: bytes, lstm_nodes: int, options: dict) -> None:
    """The variant is the LSTM nodes' own: a P input with peepholes, input_forget=1 with coupled
    gates (so ONNX Runtime's LSTM computes it, not a decomposition of ours)."""
    _assert_standard_lstm_graph(model_bytes, lstm_nodes)
    nodes = [n for n in onnx.load_from_string(model_bytes).graph.node if n.op_type == "LSTM"]
    for node in nodes:
        has_p = len(node.input) > 7 and node.input[7] != ""
        assert has_p == bool(options.get("peephole")), node
        input_forget = {a.name: a.i for a in node.attribute}.get("input_forget", 0)
        assert input_forget == int(bool(options.get("coupled_gates"))), node


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("options", VARIANTS)
def test_variant_export_matches_eager(dynamo, options):
    # ONNX Runtime's LSTM computes the variant from the exported weights: an independent check of
    # the P order, the coupled forget rows and of our kernels.
    model = lstm_ext.LSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True, **options).eval()
    args = _lstm_inputs(2, True, False, True)
    model_bytes = _export(model, args, dynamo)
    _assert_variant_nodes(model_bytes, 4, options)
    _assert_outputs(_run_onnx(model_bytes, _flat(args)), _eager(model, args), f"{options}")
    cell = lstm_ext.LSTMCell(FEATURES, HIDDEN, bias=False, **options).eval()
    x = torch.randn(BATCH, FEATURES)
    model_bytes = _export(cell, (x,), dynamo)
    _assert_variant_nodes(model_bytes, 1, options)
    for name, a, e in zip(("h", "c"), _run_onnx(model_bytes, [x]), cell(x)):
        assert_close(a, e.detach(), torch.float32, f"LSTMCell({options}) {name}")


UNROLLED_VARIANTS = [
    pytest.param(dict(layer_norm=True), id="layer_norm"),
    pytest.param(dict(zoneout=0.3), id="zoneout"),
    pytest.param(dict(layer_norm=True, zoneout=0.2, peephole=True), id="layer_norm+zoneout+peephole"),
    pytest.param(dict(layer_norm=True, coupled_gates=True), id="layer_norm+coupled"),
]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("options", UNROLLED_VARIANTS)
def test_unrolled_variant_export_matches_eager(dynamo, options):
    # ONNX's LSTM has no layer norm or zoneout: the layer exports as the reference's plain ops,
    # unrolled over T, zoneout in its eval form. Trained-looking parameters (gains and biases off
    # their init) so that each one's place in the graph shows.
    torch.manual_seed(0)
    model = lstm_ext.LSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True, **options).eval()
    cell = lstm_ext.LSTMCell(FEATURES, HIDDEN, **options).eval()
    with torch.no_grad():
        for p in [*model.parameters(), *cell.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    args = _lstm_inputs(2, True, False, True)
    model_bytes = _export(model, args, dynamo)
    _assert_standard_lstm_graph(model_bytes, 0)
    ops_in_graph = {n.op_type for n in onnx.load_from_string(model_bytes).graph.node}
    if dynamo and options.get("layer_norm"):
        assert "LayerNormalization" in ops_in_graph, ops_in_graph
    _assert_outputs(_run_onnx(model_bytes, _flat(args)), _eager(model, args), f"{options}")
    x = torch.randn(BATCH, FEATURES)
    model_bytes = _export(cell, (x,), dynamo)
    _assert_standard_lstm_graph(model_bytes, 0)
    for name, a, e in zip(("h", "c"), _run_onnx(model_bytes, [x]), cell(x)):
        assert_close(a, e.detach(), torch.float32, f"LSTMCell({options}) {name}")


def test_unrolled_variant_export_has_a_static_sequence_length():
    # Asked for a dynamic T, the dynamo exporter specializes the unrolled loop's T: the graph
    # declares it, so a runtime refuses another length instead of computing a wrong one. N stays
    # dynamic.
    model = lstm_ext.LSTM(FEATURES, HIDDEN, layer_norm=True).eval()
    args = _lstm_inputs(1, False, False, False)
    model_bytes = _export(model, args, True,
                          dynamic_shapes=({0: Dim("T"), 1: Dim("N")},))
    dims = onnx.load_from_string(model_bytes).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == STEPS and dims[1].dim_param
    other = (torch.randn(STEPS, BATCH + 2, FEATURES),)
    _assert_outputs(_run_onnx(model_bytes, _flat(other)), _eager(model, other), "dynamic N")
    with pytest.raises(Exception, match="dimensions"):
        _run_onnx(model_bytes, [torch.randn(STEPS + 2, BATCH, FEATURES)])


def test_forget_bias_exports_as_the_plain_lstm():
    # forget_bias only initializes: the module is the plain LSTM.
    model = lstm_ext.LSTM(FEATURES, HIDDEN, forget_bias=1.0).eval()
    args = _lstm_inputs(1, False, False, False)
    model_bytes = _export(model, args, False)
    _assert_variant_nodes(model_bytes, 1, {})
    _assert_outputs(_run_onnx(model_bytes, _flat(args)), _eager(model, args), "forget_bias")


@pytest.mark.parametrize("options", VARIANTS + UNROLLED_VARIANTS)
def test_translation_table_for_an_exported_variant(options):
    # Peepholes and coupled gates translate to ONNX LSTM nodes; layer norm
    # (lstm_layernorm_forward) and zoneout (lstm_variant_forward with its eval probability) to
    # their recurrence written out step by step.
    torch.manual_seed(0)
    model = lstm_ext.LSTM(FEATURES, HIDDEN, bidirectional=True, batch_first=True,
                          **options).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    args = _lstm_inputs(1, True, True, True)
    program = torch.export.export(model, args)
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    op = ("lstm_layernorm_forward" if options.get("layer_norm") else "lstm_variant_forward")
    assert getattr(torch.ops.lstm_ext, op).default in targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            program, custom_translation_table=lstm_ext.onnx.custom_translation_table(),
            verbose=False,
        )
    model_bytes = onnx_program.model_proto.SerializeToString()
    unrolled = options.get("layer_norm") or options.get("zoneout")
    if unrolled:
        _assert_standard_lstm_graph(model_bytes, 0)
    else:
        _assert_variant_nodes(model_bytes, 2, options)
    _assert_outputs(_run_onnx(model_bytes, _flat(args)), _eager(model, args), f"{options}")


def test_translation_table_refuses_a_dynamic_sequence_length_to_unroll():
    model = lstm_ext.LSTM(FEATURES, HIDDEN, layer_norm=True).eval()
    program = torch.export.export(model, (torch.randn(STEPS, BATCH, FEATURES),),
                                  dynamic_shapes=({0: Dim("T")},))
    with pytest.raises(Exception, match="the sequence length must be static"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                program,
                custom_translation_table=lstm_ext.onnx.custom_translation_table(),
                verbose=False,
            )


def test_translation_table_refuses_zoneout_masks():
    # A program exported in training mode draws zoneout's masks and passes them to the op.
    model = lstm_ext.LSTM(FEATURES, HIDDEN, zoneout=0.3).train()
    program = torch.export.export(model, (torch.randn(STEPS, BATCH, FEATURES),))
    with pytest.raises(Exception, match="zoneout's training masks .* cannot be exported"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                program,
                custom_translation_table=lstm_ext.onnx.custom_translation_table(),
                verbose=False,
            )


class _Packed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = lstm_ext.LSTM(FEATURES, HIDDEN)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return h_n


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_refuses_projections(dynamo):
    model = lstm_ext.LSTM(FEATURES, HIDDEN, proj_size=3).eval()
    with pytest.raises(Exception, match=r"proj_size > 0 \(LSTM with projections\)") as caught:
        _export(model, (torch.randn(STEPS, BATCH, FEATURES),), dynamo)
    # The dynamo exporter wraps the error; the cause is ours.
    error = caught.value
    while error.__cause__ is not None:
        error = error.__cause__
    assert type(error) is RuntimeError and str(error).startswith("lstm_ext ONNX export")


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_refuses_packed_input(dynamo):
    args = (torch.randn(STEPS, BATCH, FEATURES), torch.tensor([STEPS, 2, 3]))
    with pytest.raises(Exception, match="PackedSequence input cannot be exported"):
        _export(_Packed().eval(), args, dynamo)


def test_translation_table_refuses_projections():
    model = lstm_ext.LSTM(FEATURES, HIDDEN, proj_size=3).eval()
    program = torch.export.export(model, (torch.randn(STEPS, BATCH, FEATURES),))
    with pytest.raises(Exception, match=r"proj_size > 0 \(LSTM with projections\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                program,
                custom_translation_table=lstm_ext.onnx.custom_translation_table(),
                verbose=False,
            )


def test_stand_in_outside_an_export_runs_the_fused_op():
    # functional.py chooses the stand-ins only during an export; called outside one, they run the
    # fused operators.
    assert not lstm_ext.onnx.in_onnx_export()
    model = lstm_ext.LSTM(FEATURES, HIDDEN).eval()
    x = torch.randn(STEPS, BATCH, FEATURES)
    h0 = torch.zeros(BATCH, HIDDEN)
    expected = model(x)[0]
    actual = lstm_ext.onnx.lstm_forward(
        x, h0, h0, model.weight_ih_l0, model.weight_hh_l0, model.bias_ih_l0, model.bias_hh_l0
    )[0]
    assert torch.equal(actual, expected)


def test_import_does_not_load_onnx_packages():
    # onnx, onnxscript and onnxruntime are optional: importing lstm_ext must not pull them in.
    script = (
        "import sys, lstm_ext\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(loaded & {'onnx', 'onnxscript', 'onnx_ir', 'onnxruntime'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=pathlib.Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "[]"


# ----------------------------------------------------------------------------------------------
# The GRU: each layer and direction an ONNX GRU node (linear_before_reset=1, torch's form).

GRU_CONFIGS = [
    pytest.param(dict(num_layers=1), True, id="1layer-h0"),
    pytest.param(dict(num_layers=2, bidirectional=True), True, id="2layers-bidir-h0"),
    pytest.param(dict(bias=False, batch_first=True), False, id="nobias-batch_first"),
]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("options,with_state", GRU_CONFIGS)
def test_gru_export_matches_eager(dynamo, options, with_state):
    torch.manual_seed(0)
    gru = lstm_ext.GRU(FEATURES, HIDDEN, **options).eval()
    shape = (BATCH, STEPS, FEATURES) if gru.batch_first else (STEPS, BATCH, FEATURES)
    args = (torch.randn(shape),)
    if with_state:
        args += (torch.randn(gru.num_layers * (2 if gru.bidirectional else 1), BATCH, HIDDEN),)
    model_bytes = _export(gru, args, dynamo)
    model = onnx.load_from_string(model_bytes)
    nodes = list(model.graph.node)
    assert [n.op_type for n in nodes].count("GRU") == gru.num_layers * (
        2 if gru.bidirectional else 1)
    assert all(n.domain in ("", "ai.onnx") for n in nodes)
    onnx.checker.check_model(model)
    with torch.no_grad():
        expected = list(gru(*args))
    actual = _run_onnx(model_bytes, list(args))
    for name, a, e in zip(("output", "h_n"), actual, expected):
        assert a.shape == e.shape, f"GRU {name}: {a.shape} vs {e.shape}"
        assert_close(a, e, torch.float32, f"GRU {name}")


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gru_cell_export_matches_eager(dynamo, bias):
    cell = lstm_ext.GRUCell(FEATURES, HIDDEN, bias=bias).eval()
    args = (torch.randn(BATCH, FEATURES), torch.randn(BATCH, HIDDEN))
    model_bytes = _export(cell, args, dynamo)
    with torch.no_grad():
        expected = cell(*args)
    (actual,) = _run_onnx(model_bytes, list(args))
    assert_close(actual, expected, torch.float32, "GRUCell h")


class _PackedGru(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = lstm_ext.GRU(FEATURES, HIDDEN)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.gru(pack_padded_sequence(x, lengths, enforce_sorted=False))[1]


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_gru_export_refuses_packed_input(dynamo):
    args = (torch.randn(STEPS, BATCH, FEATURES), torch.tensor([STEPS, 2, 3]))
    with pytest.raises(Exception, match="PackedSequence input cannot be exported"):
        _export(_PackedGru().eval(), args, dynamo)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_gru_translation_table_for_an_exported_program(grad):
    table = lstm_ext.onnx.custom_translation_table()
    gru = lstm_ext.GRU(FEATURES, HIDDEN, num_layers=2, bidirectional=True).eval()
    cell = lstm_ext.GRUCell(FEATURES, HIDDEN).eval()
    cases = ((gru, (torch.randn(STEPS, BATCH, FEATURES),), 4),
             (cell, (torch.randn(BATCH, FEATURES), torch.randn(BATCH, HIDDEN)), 1))
    for module, module_args, nodes in cases:
        with torch.set_grad_enabled(grad):
            program = torch.export.export(module, module_args)
        targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
        assert targets & set(table), "the program should hold lstm_ext's operators"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, custom_translation_table=table,
                                             verbose=False)
        model_bytes = onnx_program.model_proto.SerializeToString()
        ops_ = [n.op_type for n in onnx.load_from_string(model_bytes).graph.node]
        assert ops_.count("GRU") == nodes
        actual = _run_onnx(model_bytes, list(module_args))
        with torch.no_grad():
            expected = module(*module_args)
        expected = list(expected) if isinstance(expected, tuple) else [expected]
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, torch.float32, f"{type(module).__name__} output {index}")
