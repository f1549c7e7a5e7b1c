"""Benchmark ``lstm_ext.LSTM`` against ``torch.nn.LSTM`` on each of torch's paths and the reference.

    python benchmarks/bench_lstm.py                  # CPU, float32, the three default shapes
    python benchmarks/bench_lstm.py --device cuda    # GPU: cuDNN on/off instead of oneDNN on/off
    python benchmarks/bench_lstm.py --sweep --plot sweep.png --json sweep.json

Variants, all in one process and interleaved round-robin within every repetition:

* ``lstm_ext``: ``lstm_ext.LSTM`` (the fused operators).
* ``torch_onednn`` / ``torch_native`` (CPU), ``torch_cudnn`` / ``torch_native`` (GPU):
  ``torch.nn.LSTM`` with oneDNN (cuDNN) enabled, then disabled. Each run is profiled once to
  confirm which path torch really took; a path torch does not take for a dtype (oneDNN has no
  float64 LSTM) is skipped, with a note.
* ``reference``: ``lstm_ext.reference.lstm``, the plain-PyTorch oracle.
* ``reference_compiled`` (``--compile``): the reference under ``torch.compile``; the first call
  (compilation included) is reported separately as compile time.

``--cell gru`` runs ``lstm_ext.GRU`` against ``torch.nn.GRU`` (and ``reference.gru``) instead;
``--cell peephole|cifg|layernorm|zoneout`` runs ``lstm_ext.LSTM`` with that variant option against
the plain-PyTorch implementation of it (``reference.lstm_variant_layer``, and compiled with
``--compile``), torch having no LSTM variants.

Per shape and mode (inference: forward under ``no_grad``; training: forward plus backward to the
input and every parameter), the script runs warm-up rounds, one profiled check round (peak memory,
path check, and lstm_ext's max abs difference from every other variant), then timed rounds. Each
speedup is the median over rounds of ``t_variant / t_lstm_ext`` from the same round.

Shapes: ``T`` time, ``N`` batch, ``C`` input size, ``H`` hidden size, ``L`` layers,
``D`` directions. See benchmarks/README.md for how to read the output and the JSON schema.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import io
import itertools
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# _bench_utils also makes an in-place build of lstm_ext importable, so it comes before lstm_ext.
import _bench_utils as bu
import torch
from torch import Tensor

import lstm_ext
from lstm_ext import reference

SCHEMA = "lstm_ext.bench_lstm/1"

# Auto repetitions: timed rounds until DEFAULT_TARGET_SECONDS have passed per shape and mode, within
# these bounds. Three is the fewest that gives a median and quartiles; the default run has to fit
# in 3 minutes on 2 cores, where one training round of the large shape takes several seconds.
DEFAULT_TARGET_SECONDS = 6.0
MIN_AUTO_REPS = 3
MAX_AUTO_REPS = 100

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MODES = ("inference", "training")

# Tolerances for lstm_ext against torch.nn.LSTM in fp32/fp64: |diff| <= ATOL + RTOL * max|torch|,
# per tensor. fp16/bf16 use the design's rule instead: lstm_ext's error against a float64 reference
# must be at most LOW_PRECISION_FACTOR times torch.nn.LSTM's error in the same dtype.
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-10, 1e-9)}
LOW_PRECISION_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class Shape:
    """One problem size: input ``[T, N, C]``, hidden size ``H``, ``L`` layers, ``D`` directions."""

    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    layers: int = 1
    bidirectional: bool = False

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def name(self) -> str:
        text = f"T{self.seq_len} N{self.batch} C{self.input_size} H{self.hidden_size}"
        if self.layers > 1:
            text += f" L{self.layers}"
        if self.bidirectional:
            text += " bidir"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "name": self.name}


PRESETS: dict[str, Shape] = {
    # The community-standard LSTM benchmark size (PyTorch's benchmarks/fastrnns).
    "large": Shape(100, 64, 512, 512),
    "medium": Shape(100, 32, 256, 256),
    # Batch 1: latency-bound, where per-step overheads dominate.
    "latency": Shape(50, 1, 128, 128),
}
DEFAULT_PRESETS = ("large", "medium", "latency")
GRID_DEFAULTS = {"seq_len": 100, "batch": 64, "hidden": 512}

# --grid: the shapes real models use, T x N x C=H x layers, with sizes that are not multiples of
# the SIMD width among them (200, 20). The full product is 384 shapes; the grid samples it so that
# every (N, H) pair appears once, each T and each layer count equally often, and a 2-core run of
# both modes takes about ten minutes.
GRID_SEQ_LENS = (1, 35, 100, 500)
GRID_BATCHES = (1, 2, 4, 8, 20, 32, 64, 128)
GRID_HIDDENS = (64, 128, 200, 256, 512, 1024)
GRID_LAYERS = (1, 2)
# A point's forward GEMM work is capped (2 T N 4H (C + H) L flops): past it, T steps down the
# grid's values. About 0.1 s of forward on 2 cores, so no single point dominates the run.
GRID_FLOP_CAP = 2.5e10
GRID_TARGET_SECONDS = 0.5

# --sweep: batch sizes at a fixed hidden size, and hidden sizes at a fixed batch, at one T.
SWEEP_SEQ_LEN = 50
SWEEP_BATCHES = (1, 4, 16, 32, 64, 128)
SWEEP_HIDDENS = (64, 128, 256, 512, 1024)
SWEEP_CENTER_BATCH = 32
SWEEP_CENTER_HIDDEN = 256


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """One implementation to time.

    ``expect_op`` must appear in the profile of a run for the variant to be what its label says,
    ``forbid_op`` must not: that is how a "torch (oneDNN)" run is confirmed to have used oneDNN.
    """

    key: str
    label: str
    kind: str  # "ext", "torch", "reference", "compiled"
    backend_flag: str | None = None  # "mkldnn" or "cudnn": the torch.backends switch it sets
    backend_enabled: bool = True
    expect_op: str | None = None
    forbid_op: str | None = None


EXT = VariantSpec("lstm_ext", "lstm_ext", "ext", expect_op="lstm_ext::lstm_forward")
ONEDNN_OP = "aten::mkldnn_rnn_layer"
CUDNN_OP = "aten::_cudnn_rnn"
CPU_BASELINES = (
    VariantSpec("torch_onednn", "torch (oneDNN)", "torch", "mkldnn", True, expect_op=ONEDNN_OP),
    VariantSpec("torch_native", "torch (native)", "torch", "mkldnn", False, forbid_op=ONEDNN_OP),
)
CUDA_BASELINES = (
    VariantSpec("torch_cudnn", "torch (cuDNN)", "torch", "cudnn", True, expect_op=CUDNN_OP),
    VariantSpec("torch_native", "torch (native)", "torch", "cudnn", False, forbid_op=CUDNN_OP),
)
REFERENCE = VariantSpec("reference", "reference", "reference")
COMPILED = VariantSpec("reference_compiled", "reference (compiled)", "compiled")
# The CPU runtimes LSTMs are deployed with, on the same weights: the model exported with
# lstm_ext's ONNX exporter (one ONNX LSTM node per layer and direction), run by the runtime's
# own LSTM kernel. Inference only; optional packages, skipped with the reason when absent.
ONNXRUNTIME = VariantSpec("onnxruntime", "ONNX Runtime", "runtime")
OPENVINO = VariantSpec("openvino", "OpenVINO", "runtime")
RUNTIMES = (ONNXRUNTIME, OPENVINO)
RUNTIME_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


# --cell: the recurrent cell every variant runs. The GRU runs lstm_ext.GRU against torch.nn.GRU
# (whose CPU layer has no oneDNN path in torch: the oneDNN variant is then reported as skipped by
# the path check) and lstm_ext.reference.gru; the runtimes run torch's own ONNX GRU export. The
# LSTM variants (lstm_ext.LSTM's options) have no torch.nn counterpart: they run against the
# plain-PyTorch implementation a user would write, lstm_ext.reference.lstm_variant_layer (and it
# compiled, with --compile).
VARIANT_CELLS = {
    "peephole": {"peephole": True},
    "cifg": {"coupled_gates": True},
    "layernorm": {"layer_norm": True},
    "zoneout": {"zoneout": 0.25},
}
CELLS = ("lstm", "gru", *VARIANT_CELLS)
EXT_OPS = {
    "lstm": "lstm_ext::lstm_forward",
    "gru": "lstm_ext::gru_forward",
    "peephole": "lstm_ext::lstm_variant_forward",
    "cifg": "lstm_ext::lstm_variant_forward",
    "layernorm": "lstm_ext::lstm_layernorm_forward",
    "zoneout": "lstm_ext::lstm_variant_forward",
}


def variant_reference(options: dict[str, Any], names: list[str]) -> Callable[..., Any]:
    """A stacked LSTM variant from reference.lstm_variant_layer, with reference.lstm's arguments;
    ``params`` are the lstm_ext.LSTM's parameters in the order of ``names``."""

    def run(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
        by_name = dict(zip(names, params))
        h0, c0 = hx
        directions = 2 if bidirectional else 1
        layer_input, h_n, c_n = x, [], []
        for layer in range(num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                index = layer * directions + direction
                layer_norm = None
                if options.get("layer_norm"):
                    layer_norm = {
                        key: by_name[f"layer_norm_{key}{suffix}"]
                        for key in ("weight_ih", "weight_hh", "weight_c", "bias_c")
                    }
                out, h, c = reference.lstm_variant_layer(
                    layer_input, h0[index], c0[index], by_name["weight_ih" + suffix],
                    by_name["weight_hh" + suffix], by_name.get("bias_ih" + suffix),
                    by_name.get("bias_hh" + suffix), reverse=direction == 1,
                    peephole=by_name.get("peephole" + suffix),
                    coupled_gates=bool(options.get("coupled_gates")), layer_norm=layer_norm,
                    zoneout=float(options.get("zoneout", 0.0)), training=train,
                )
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        return layer_input, torch.stack(h_n), torch.stack(c_n)

    return run


def available_variants(
    device: torch.device, compile_reference: bool, cell: str = "lstm"
) -> list[VariantSpec]:
    """lstm_ext first (every speedup is relative to it), then torch's paths, then the reference."""
    baselines = CUDA_BASELINES if device.type == "cuda" else (*CPU_BASELINES, *RUNTIMES)
    ext = dataclasses.replace(EXT, expect_op=EXT_OPS[cell])
    if cell in VARIANT_CELLS:
        # torch has no LSTM variants: the reference is the baseline.
        variants = [ext, REFERENCE]
        if compile_reference:
            variants.append(COMPILED)
        return variants
    variants = [ext, *baselines, REFERENCE]
    if compile_reference:
        variants.append(COMPILED)
    return variants


# ------------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from error
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _shape_from_text(text: str) -> Shape:
    """A preset name, or ``TxNxCxH`` / ``TxNxH`` (C = H)."""
    if text in PRESETS:
        return PRESETS[text]
    parts = text.lower().split("x")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 3:
        sizes = [sizes[0], sizes[1], sizes[2], sizes[2]]
    if len(sizes) != 4 or any(size <= 0 for size in sizes):
        raise ValueError(
            f"unknown shape {text!r}: use a preset ({', '.join(PRESETS)}) or TxNxCxH, "
            "e.g. 100x64x512x512"
        )
    return Shape(*sizes)


def forward_flops(shape: Shape) -> float:
    """The forward pass's GEMM flops: per step and layer [N, C_l + H] x [C_l + H, 4H]."""
    total = 0.0
    for layer in range(shape.layers):
        inputs = shape.input_size if layer == 0 else shape.hidden_size * shape.directions
        total += 2 * shape.seq_len * shape.batch * 4 * shape.hidden_size * (
            inputs + shape.hidden_size
        ) * shape.directions
    return total


def grid_shapes() -> list[Shape]:
    """The --grid sample: one shape per (N, H), T and layers in a balanced rotation, capped."""
    shapes = []
    for i, batch in enumerate(GRID_BATCHES):
        for j, hidden in enumerate(GRID_HIDDENS):
            # Rotations by i + 2j and i + j: over the 48 pairs each T appears 12 times and each
            # layer count 24 times, and neither follows N or H alone.
            t_index = (i + 2 * j) % len(GRID_SEQ_LENS)
            layers = GRID_LAYERS[(i + j) % len(GRID_LAYERS)]
            shape = Shape(GRID_SEQ_LENS[t_index], batch, hidden, hidden, layers)
            while t_index > 0 and forward_flops(shape) > GRID_FLOP_CAP:
                t_index -= 1
                shape = dataclasses.replace(shape, seq_len=GRID_SEQ_LENS[t_index])
            shapes.append(shape)
    return shapes


def grid_summary(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: lstm_ext against the best peer at each point, and over the grid.

    A point's "best peer" is the variant other than lstm_ext and the reference with the lowest
    median time (torch's oneDNN or native path; in inference also ONNX Runtime and OpenVINO when
    installed); its speedup is that variant's paired median ratio t_peer / t_lstm_ext.
    """
    summary: dict[str, Any] = {}
    for mode in dict.fromkeys(case["mode"] for case in cases):
        points = []
        for case in cases:
            if case["mode"] != mode:
                continue
            peers = {
                key: value
                for key, value in case["speedup"].items()
                if not key.startswith("reference")
            }
            if not peers:
                continue
            best = min(peers, key=lambda key: peers[key]["median"])
            points.append(
                {
                    "shape": case["shape"]["name"],
                    "seq_len": case["shape"]["seq_len"],
                    "batch": case["shape"]["batch"],
                    "hidden_size": case["shape"]["hidden_size"],
                    "layers": case["shape"]["layers"],
                    "best_peer": best,
                    "speedup": peers[best]["median"],
                }
            )
        speedups = [point["speedup"] for point in points]
        summary[mode] = {
            "points": points,
            "median_speedup": statistics.median(speedups) if speedups else None,
            "min_speedup": min(speedups) if speedups else None,
            "below_1x": [p["shape"] for p in points if p["speedup"] < 1.0],
        }
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Time lstm_ext.LSTM against torch.nn.LSTM (each torch path on the device) and the "
            "pure-PyTorch reference, interleaved in one process; report medians, spread, paired "
            "speedups, peak memory and lstm_ext's max abs difference from each of them."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    where = parser.add_argument_group("device and numerics")
    where.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    where.add_argument("--dtype", default="float32", choices=list(DTYPES))
    where.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N); default: leave torch's choice (it is printed)",
    )
    where.add_argument(
        "--allow-tf32",
        action="store_true",
        help="GPU: let cuBLAS and cuDNN use TF32 for float32 (off by default so that every "
        "variant computes in real float32)",
    )
    where.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")

    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--shapes",
        type=_name_list,
        default=None,
        help=f"comma-separated presets ({', '.join(f'{k}={v.name}' for k, v in PRESETS.items())}) "
        f"or TxNxCxH sizes; default: {','.join(DEFAULT_PRESETS)} unless a size list is given",
    )
    what.add_argument("--seq-lens", type=_int_list, default=None, help="T values (grid or sweep)")
    what.add_argument(
        "--batch-sizes", type=_int_list, default=None, help="N values (grid or sweep)"
    )
    what.add_argument(
        "--hidden-sizes", type=_int_list, default=None, help="H values (grid or sweep); C = H"
    )
    what.add_argument(
        "--input-size", type=int, default=None, help="C for every shape (default: C = H)"
    )
    what.add_argument(
        "--cell",
        default="lstm",
        choices=CELLS,
        help="the cell: lstm (lstm_ext.LSTM against torch.nn.LSTM), gru (lstm_ext.GRU against "
        f"torch.nn.GRU), or an LSTM variant ({', '.join(VARIANT_CELLS)}: lstm_ext.LSTM with that "
        "option against the plain-PyTorch reference; add --compile for it compiled too)",
    )
    what.add_argument("--layers", type=int, default=1, help="num_layers of every LSTM")
    what.add_argument("--bidirectional", action="store_true", help="bidirectional LSTMs")
    what.add_argument(
        "--sweep",
        action="store_true",
        help=f"sweep N over {list(SWEEP_BATCHES)} at H={SWEEP_CENTER_HIDDEN} and H over "
        f"{list(SWEEP_HIDDENS)} at N={SWEEP_CENTER_BATCH}, T={SWEEP_SEQ_LEN} (--batch-sizes, "
        "--hidden-sizes, --seq-lens override the values)",
    )
    what.add_argument(
        "--grid",
        action="store_true",
        help=f"the grid of shapes real models use: T in {list(GRID_SEQ_LENS)}, N in "
        f"{list(GRID_BATCHES)}, C=H in {list(GRID_HIDDENS)}, layers {list(GRID_LAYERS)}, sampled "
        "to one shape per (N, H) (~10 minutes on 2 cores); reports lstm_ext against the best "
        "peer per point and writes a heat map with --plot. Without --variants the reference is "
        f"left out, and --target-time defaults to {GRID_TARGET_SECONDS:g} s",
    )
    what.add_argument(
        "--modes", type=_name_list, default=list(MODES), help="inference and/or training"
    )
    what.add_argument(
        "--variants",
        type=_name_list,
        default=None,
        help="subset of variant keys to run (lstm_ext is always run); default: all for the device",
    )
    what.add_argument(
        "--compile",
        action="store_true",
        help="also time the reference under torch.compile (compile time reported separately)",
    )
    what.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend for --compile"
    )

    how = parser.add_argument_group("method")
    how.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed rounds per shape and mode; default: auto, enough to fill --target-time "
        f"({MIN_AUTO_REPS} to {MAX_AUTO_REPS})",
    )
    how.add_argument("--warmup", type=int, default=1, help="untimed rounds before the check round")
    how.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="K",
        help="run K busy-loop processes (one core's worth of load each) for the whole run: "
        "every variant timed under the same load, as when a data loader shares the cores",
    )
    how.add_argument(
        "--target-time",
        type=float,
        default=None,
        help="seconds of timed rounds per shape and mode when --reps is auto (default: "
        f"{DEFAULT_TARGET_SECONDS:g}, with --grid {GRID_TARGET_SECONDS:g})",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="write every figure as JSON; a folder (e.g. benchmarks/results/) gets a file named by "
        "device and date",
    )
    out.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help="write a PNG of the speedups (needs matplotlib)",
    )
    return parser


def resolve_shapes(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[list[Shape], dict[str, Any] | None]:
    """The shapes to run, and for ``--sweep`` which shapes form the batch and hidden sweeps."""

    def finish(shape: Shape) -> Shape:
        return dataclasses.replace(
            shape,
            input_size=args.input_size or shape.input_size,
            layers=args.layers,
            bidirectional=args.bidirectional,
        )

    if args.grid:
        given = [
            option
            for option, value in (
                ("--sweep", args.sweep), ("--shapes", args.shapes), ("--seq-lens", args.seq_lens),
                ("--batch-sizes", args.batch_sizes), ("--hidden-sizes", args.hidden_sizes),
                ("--input-size", args.input_size), ("--bidirectional", args.bidirectional),
            )
            if value
        ]
        if given or args.layers != 1:
            parser.error(f"--grid sets the shapes itself: drop {', '.join(given) or '--layers'}")
        return grid_shapes(), None
    if args.sweep:
        if args.shapes:
            parser.error("--sweep and --shapes cannot be combined")
        if args.seq_lens and len(args.seq_lens) > 1:
            parser.error("--sweep takes a single --seq-lens value")
        seq_len = args.seq_lens[0] if args.seq_lens else SWEEP_SEQ_LEN
        batches = args.batch_sizes or list(SWEEP_BATCHES)
        hiddens = args.hidden_sizes or list(SWEEP_HIDDENS)
        # The fixed size of each sweep: the usual centre if the other list has it, else its middle.
        center_batch = (
            SWEEP_CENTER_BATCH if SWEEP_CENTER_BATCH in batches else batches[len(batches) // 2]
        )
        center_hidden = (
            SWEEP_CENTER_HIDDEN if SWEEP_CENTER_HIDDEN in hiddens else hiddens[len(hiddens) // 2]
        )
        batch_shapes = [finish(Shape(seq_len, n, center_hidden, center_hidden)) for n in batches]
        hidden_shapes = [finish(Shape(seq_len, center_batch, h, h)) for h in hiddens]
        shapes = list(dict.fromkeys(batch_shapes + hidden_shapes))
        sweep = {
            "batch": {
                "hidden_size": center_hidden,
                "values": batches,
                "shapes": [s.name for s in batch_shapes],
            },
            "hidden": {
                "batch": center_batch,
                "values": hiddens,
                "shapes": [s.name for s in hidden_shapes],
            },
        }
        return shapes, sweep

    grid_given = any(v is not None for v in (args.seq_lens, args.batch_sizes, args.hidden_sizes))
    names = args.shapes
    if names is None:
        names = [] if grid_given else list(DEFAULT_PRESETS)
    shapes = []
    for name in names:
        try:
            shapes.append(finish(_shape_from_text(name)))
        except ValueError as error:
            parser.error(str(error))
    if grid_given:
        for seq_len, batch, hidden in itertools.product(
            args.seq_lens or [GRID_DEFAULTS["seq_len"]],
            args.batch_sizes or [GRID_DEFAULTS["batch"]],
            args.hidden_sizes or [GRID_DEFAULTS["hidden"]],
        ):
            shapes.append(finish(Shape(seq_len, batch, hidden, hidden)))
    return list(dict.fromkeys(shapes)), None


# ------------------------------------------------------------------------------------------------
# One shape: inputs, modules, and the step each variant runs


@contextlib.contextmanager
def backend_enabled(flag: str | None, enabled: bool) -> Iterator[None]:
    """Switch oneDNN or cuDNN on or off for the block, touching no other backend setting.

    Not ``torch.backends.{mkldnn,cudnn}.flags(...)``: those also reset every other setting they
    take (cuDNN's allow_tf32 back to True, for one) to their own defaults for the block.
    """
    if flag is None:
        yield
        return
    module = torch.backends.mkldnn if flag == "mkldnn" else torch.backends.cudnn
    previous = module.enabled
    module.enabled = enabled
    try:
        yield
    finally:
        module.enabled = previous


# A step's result: (output, h_n, c_n) and the gradients (input, then each flat weight) or ().
StepResult = tuple[tuple[Tensor, ...], tuple[Tensor, ...]]


class Workload:
    """What every variant of one shape, dtype and mode shares: weights, input, states, gradients.

    ``torch.nn.LSTM`` is initialized from the seed and ``lstm_ext.LSTM`` gets its ``state_dict``;
    the reference runs on the torch module's parameters. Training draws random gradients for the
    output ``[T, N, D*H]``, ``h_n`` and ``c_n`` ``[L*D, N, H]``, so the backward pass sees a
    realistic upstream gradient rather than the ones of ``.sum()``.
    """

    def __init__(
        self,
        shape: Shape,
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
        training: bool,
        cell: str = "lstm",
    ) -> None:
        torch.manual_seed(seed)
        options = {"device": device, "dtype": dtype}
        self.shape = shape
        self.training = training
        self.cell = cell
        self.seed = seed
        # The GRU carries h alone: every (h, c) below is then (h,), and outputs (output, h_n).
        self.state_count = 1 if cell == "gru" else 2
        sizes = (shape.input_size, shape.hidden_size, shape.layers)
        if cell in VARIANT_CELLS:
            # No torch module: the reference runs on lstm_ext's parameters.
            self.torch_lstm = None
            self.ext_lstm = lstm_ext.LSTM(
                *sizes, bidirectional=shape.bidirectional, **options, **VARIANT_CELLS[cell]
            )
            self.weight_names = [name for name, _ in self.ext_lstm.named_parameters()]
            self.reference = variant_reference(VARIANT_CELLS[cell], self.weight_names)
        else:
            torch_module, ext_module = (
                (torch.nn.LSTM, lstm_ext.LSTM) if cell == "lstm" else (torch.nn.GRU, lstm_ext.GRU)
            )
            self.reference = reference.lstm if cell == "lstm" else reference.gru
            self.torch_lstm = torch_module(*sizes, bidirectional=shape.bidirectional, **options)
            self.ext_lstm = ext_module(*sizes, bidirectional=shape.bidirectional, **options)
            self.ext_lstm.load_state_dict(self.torch_lstm.state_dict())
            self.torch_lstm.train(training)
            self.weight_names = list(self.torch_lstm._flat_weights_names)
        # Inference is what a deployed model runs: eval() mode, no autograd.
        self.ext_lstm.train(training)
        # Zoneout in training draws random masks: every variant reseeds before its forward, so
        # that lstm_ext and the reference draw the same masks and their results compare.
        self.reseed = cell == "zoneout" and training
        if self.reseed:
            # Inductor draws random numbers with its own generator unless told to fall back to
            # eager's: without this the compiled reference's masks would differ from everyone's.
            torch._inductor.config.fallback_random = True
        states = (shape.layers * shape.directions, shape.batch, shape.hidden_size)
        self.input = torch.randn(shape.seq_len, shape.batch, shape.input_size, **options)
        self.input.requires_grad_(training)
        self.h0 = torch.randn(states, **options)
        self.c0 = torch.randn(states, **options)
        output_size = (shape.seq_len, shape.batch, shape.directions * shape.hidden_size)
        self.grad_outputs = (
            torch.randn(output_size, **options),
            torch.randn(states, **options),
            torch.randn(states, **options),
        )[: 1 + self.state_count]

    @property
    def hx(self) -> tuple[Tensor, ...]:
        """The initial state as the modules take it: (h0, c0), or the GRU's h0."""
        return self.h0 if self.cell == "gru" else (self.h0, self.c0)

    def tensor_names(self) -> tuple[list[str], list[str]]:
        """Names of a step's outputs and (training) gradients, in order."""
        grads = ["input", *self.weight_names] if self.training else []
        return ["output", "h_n", "c_n"][: 1 + self.state_count], grads

    @property
    def baseline_module(self) -> torch.nn.Module:
        """The module whose parameters the reference runs on: torch's, or for the variants ours."""
        return self.torch_lstm if self.torch_lstm is not None else self.ext_lstm

    def _module_forward(self, module: torch.nn.Module) -> Callable[..., tuple[Tensor, ...]]:
        """module(x, hx) as a flat (output, h_n[, c_n])."""
        if self.cell != "gru":

            def forward(x: Tensor, hx: Any) -> tuple[Tensor, ...]:
                output, (h_n, c_n) = module(x, hx)
                return output, h_n, c_n

        else:

            def forward(x: Tensor, hx: Any) -> tuple[Tensor, ...]:
                return tuple(module(x, hx))

        return forward

    def make_step(self, spec: VariantSpec, compile_backend: str) -> Callable[[], StepResult]:
        """The zero-argument callable that is timed for ``spec``."""
        shape = self.shape
        if spec.kind == "ext":
            params = [getattr(self.ext_lstm, name) for name in self.weight_names]
            forward = self._module_forward(self.ext_lstm)
        elif spec.kind == "runtime":
            return self._runtime_step(spec)
        elif spec.kind == "torch":
            params = [getattr(self.torch_lstm, name) for name in self.weight_names]
            forward = self._module_forward(self.torch_lstm)
        else:
            params = [getattr(self.baseline_module, name) for name in self.weight_names]
            function = self.reference
            if spec.kind == "compiled":
                function = torch.compile(self.reference, backend=compile_backend)

            def forward(x: Tensor, hx: Any) -> tuple[Tensor, ...]:
                return function(
                    x,
                    hx,
                    params,
                    True,
                    shape.layers,
                    0.0,
                    self.training,
                    shape.bidirectional,
                    False,
                )

        x, hx, grad_outputs = self.input, self.hx, self.grad_outputs
        if self.reseed:
            unseeded = forward

            def forward(x: Tensor, hx: Any) -> tuple[Tensor, ...]:
                torch.manual_seed(self.seed)
                return unseeded(x, hx)

        if self.training:
            inputs = [x, *params]

            def step() -> StepResult:
                outputs = forward(x, hx)
                # autograd.grad, not .backward(): nothing accumulates in .grad between rounds.
                grads = torch.autograd.grad(outputs, inputs, grad_outputs)
                return outputs, tuple(grads)

        else:

            def step() -> StepResult:
                with torch.no_grad():
                    return forward(x, hx), ()

        return step


    def runtime_skip_reason(self, spec: VariantSpec) -> str | None:
        """Why a deployment runtime cannot run this case, or None if it can."""
        if self.training:
            return "inference only (a deployment runtime)"
        if self.input.device.type != "cpu" or self.input.dtype != torch.float32:
            # onnxruntime's CPU LSTM has no float64 kernel; the half types are not compared.
            return "CPU float32 only"
        package = RUNTIME_PACKAGES[spec.key]
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (optional: pip install {package})"
        return None

    def _onnx_model(self) -> bytes:
        """The lstm_ext module exported as ONNX (TorchScript exporter: fast, no onnx package).

        The GRU, which lstm_ext's exporter does not cover, is torch.nn.GRU's own export (ONNX GRU
        nodes), on the same weights.
        """
        buffer = io.BytesIO()
        module = self.ext_lstm if self.cell == "lstm" else self.torch_lstm
        names = ["input", "h0", "c0"][: 1 + self.state_count]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                module, (self.input, self.hx), buffer, dynamo=False, input_names=names,
                output_names=["output", "h_n", "c_n"][: 1 + self.state_count],
            )
        return buffer.getvalue()

    def _runtime_step(self, spec: VariantSpec) -> Callable[[], StepResult]:
        threads = torch.get_num_threads()
        model = self._onnx_model()
        feeds = [t.detach().numpy() for t in (self.input, self.h0, self.c0)[: 1 + self.state_count]]
        if spec.key == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # ONNX Runtime's threads spin-wait after each run by default, taking the cores from
            # whichever variant runs next in the interleaved rounds (2x slower steps were seen).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(
                model, options, providers=["CPUExecutionProvider"]
            )
            named = dict(zip(["input", "h0", "c0"], feeds))

            def run() -> list[Any]:
                return session.run(None, named)

        else:
            import openvino

            core = openvino.Core()
            # f32: on CPUs with bfloat16 units OpenVINO otherwise computes in bfloat16.
            config = {
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32",
            }
            compiled = core.compile_model(core.read_model(model=model), "CPU", config)
            request = compiled.create_infer_request()

            def run() -> list[Any]:
                request.infer(feeds)
                return [request.get_output_tensor(k).data for k in range(len(feeds))]

        def step() -> StepResult:
            return tuple(torch.from_numpy(out) for out in run()), ()

        return step


# ------------------------------------------------------------------------------------------------
# Measurement


def synchronizer(device: torch.device) -> Callable[[], None]:
    """``torch.cuda.synchronize`` on a GPU (kernels run asynchronously), nothing on the CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_call(step: Callable[[], StepResult], sync: Callable[[], None]) -> float:
    """Seconds for one step, synchronized on both sides."""
    sync()
    start = time.perf_counter()
    result = step()
    sync()
    elapsed = time.perf_counter() - start
    # Freed after the clock stops: the time is the computation, not the deallocation.
    del result
    return elapsed


def _peak_from_memory_events(events: Sequence[Any]) -> int | None:
    """Peak of the running sum of CPU allocations (+) and frees (-) recorded by the profiler."""
    memory = [e for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    memory.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in memory:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def profiled_call(
    step: Callable[[], StepResult], device: torch.device
) -> tuple[StepResult, int | None, set[str]]:
    """Run one step under the profiler: its result, its peak memory in bytes, the ops it ran.

    Peak memory is the most memory the step held at any moment beyond what was allocated before
    it started (weights and inputs are not counted; outputs, saved activations, workspaces and
    gradients are). GPU: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the same
    quantity rebuilt from the profiler's memory events, i.e. allocations through PyTorch's CPU
    allocator; memory a library allocates privately (e.g. a BLAS packing buffer) is not seen.
    """
    sync = synchronizer(device)
    profile_cpu_memory = device.type == "cpu"
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    with (
        bu.quiet_native_stderr(),
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=profile_cpu_memory
        ) as prof,
    ):
        result = step()
        sync()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without this (private) accessor: no op list, no CPU peak
        events = []
    ops = {event.name() for event in events}
    if device.type == "cuda":
        peak: int | None = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = _peak_from_memory_events(events) if events else None
    return result, peak, ops


def _max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _max_abs(a: Tensor) -> float:
    return a.detach().double().abs().max().item()


def compare(
    ext: StepResult, other: StepResult, names: tuple[list[str], list[str]]
) -> dict[str, Any]:
    """lstm_ext's max abs difference from another variant's result, per tensor and per group.

    ``scale`` is the other variant's max abs value per tensor, to judge a difference against.
    """
    per_tensor: dict[str, float] = {}
    scale: dict[str, float] = {}
    for mine, theirs, group_names in zip(ext, other, names):
        for name, a, b in zip(group_names, mine, theirs):
            per_tensor[name] = _max_abs_diff(a, b)
            scale[name] = _max_abs(b)
    output_names, grad_names = names
    return {
        "output_max_abs_diff": max(per_tensor[n] for n in output_names),
        "grad_max_abs_diff": max(per_tensor[n] for n in grad_names) if grad_names else None,
        "per_tensor": per_tensor,
        "scale": scale,
    }


def within_tolerance(comparison: dict[str, Any], dtype: torch.dtype) -> bool | None:
    """fp32/fp64: every tensor within ``atol + rtol * scale``; None for dtypes judged otherwise."""
    if dtype not in TOLERANCES:
        return None
    atol, rtol = TOLERANCES[dtype]
    return all(
        diff <= atol + rtol * comparison["scale"][name]
        for name, diff in comparison["per_tensor"].items()
    )


def float64_oracle(work: Workload) -> StepResult:
    """The reference in float64 on float64 copies of the weights, input and states."""
    params = [
        getattr(work.baseline_module, name).detach().double().requires_grad_(work.training)
        for name in work.weight_names
    ]
    x = work.input.detach().double().requires_grad_(work.training)
    hx = work.h0.double() if work.cell == "gru" else (work.h0.double(), work.c0.double())
    shape = work.shape
    if work.reseed:
        torch.manual_seed(work.seed)
    with torch.set_grad_enabled(work.training):
        outputs = work.reference(
            x, hx, params, True, shape.layers, 0.0, work.training, shape.bidirectional, False
        )
        if not work.training:
            return outputs, ()
        grads = torch.autograd.grad(outputs, [x, *params], [g.double() for g in work.grad_outputs])
    return outputs, tuple(grads)


@dataclasses.dataclass
class Settings:
    """The method's knobs, shared by every shape and mode."""

    device: torch.device
    dtype: torch.dtype
    seed: int
    warmup: int
    reps: int | None
    target_time: float
    compile_backend: str
    cell: str = "lstm"


@dataclasses.dataclass
class VariantRun:
    """What happened to one variant in one shape and mode."""

    spec: VariantSpec
    step: Callable[[], StepResult] | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    warmup_times: list[float] = dataclasses.field(default_factory=list)
    check_time: float | None = None
    compile_s: float | None = None
    peak_bytes: int | None = None
    ops: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.step is not None and self.error is None and self.skipped is None

    def attempt(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` with the variant's backend setting; a failure disables the variant.

        One variant failing (out of memory, a dtype a path lacks) must not end a long run: the
        error is recorded, reported, and turns the exit status nonzero.
        """
        with backend_enabled(self.spec.backend_flag, self.spec.backend_enabled):
            try:
                return action()
            except Exception as error:
                # First line only: a CUDA or compiler error can run to pages.
                text = f"{type(error).__name__}: {error}".strip()
                self.error = text.splitlines()[0][:300]
                return None

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.spec.label,
            "times_s": self.times,
            "stats_s": bu.summarize(self.times) if self.times else None,
            "warmup_times_s": self.warmup_times,
            "check_time_s": self.check_time,
            "compile_s": self.compile_s,
            "peak_memory_bytes": self.peak_bytes,
            "ops": self.ops,
            "skipped": self.skipped,
            "error": self.error,
        }


def _rotated(items: Sequence[VariantRun], start: int) -> list[VariantRun]:
    """Round-robin order: round r starts with variant r, so no variant always runs first."""
    if not items:
        return []
    start %= len(items)
    return [*items[start:], *items[:start]]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _enough_rounds(done: int, elapsed: float, settings: Settings) -> bool:
    """--reps N: exactly N rounds. Auto: rounds until --target-time has passed, within bounds.

    Deciding as the rounds go, rather than from a first estimate, keeps the run's length
    predictable when the machine slows down or speeds up half-way (a shared 2-core box does).
    """
    if settings.reps is not None:
        return done >= settings.reps
    if done < MIN_AUTO_REPS:
        return False
    return done >= MAX_AUTO_REPS or elapsed >= settings.target_time


def run_case(
    shape: Shape, mode: str, variants: Sequence[VariantSpec], settings: Settings, label: str
) -> dict[str, Any]:
    """Benchmark every variant on one shape and mode; returns the case's JSON record."""
    started = time.perf_counter()
    training = mode == "training"
    device = settings.device
    sync = synchronizer(device)
    _progress(f"{label} {shape.name} {mode}: preparing")
    work = Workload(shape, settings.dtype, device, settings.seed, training, settings.cell)
    names = work.tensor_names()
    runs = {spec.key: VariantRun(spec) for spec in variants}

    if any(spec.kind == "compiled" for spec in variants):
        # A fresh cache per case: the compile time measured is this shape's, and the recompile
        # limit is never reached however many shapes run.
        torch._dynamo.reset()
    for run in runs.values():
        if run.spec.kind == "runtime":
            run.skipped = work.runtime_skip_reason(run.spec)
            if run.skipped:
                continue
        run.step = run.attempt(lambda run=run: work.make_step(run.spec, settings.compile_backend))

    def usable() -> list[VariantRun]:
        return [run for run in runs.values() if run.usable]

    for run in usable():
        if run.spec.kind == "compiled":
            _progress(f"    compiling {run.spec.label} ({settings.compile_backend}) ...")
            run.compile_s = run.attempt(lambda run=run: timed_call(run.step, sync))
            if run.compile_s is not None:
                _progress(f"    compiled: first call {run.compile_s:.1f} s, compilation included")

    for round_index in range(settings.warmup):
        for run in _rotated(usable(), round_index):
            elapsed = run.attempt(lambda run=run: timed_call(run.step, sync))
            if elapsed is not None:
                run.warmup_times.append(elapsed)

    # The check round: one profiled step per variant, for peak memory, the path actually taken
    # and the results that lstm_ext is compared with. It is not timed.
    results: dict[str, StepResult] = {}
    for run in usable():
        check_start = time.perf_counter()
        outcome = run.attempt(lambda run=run: profiled_call(run.step, device))
        if outcome is None:
            continue
        run.check_time = time.perf_counter() - check_start
        result, run.peak_bytes, ops = outcome
        run.ops = sorted(op for op in ops if any(k in op.lower() for k in ("lstm", "gru", "rnn")))
        spec = run.spec
        missing = spec.expect_op is not None and spec.expect_op not in ops
        forbidden = spec.forbid_op is not None and spec.forbid_op in ops
        if missing or forbidden:
            why = f"{spec.expect_op} was not called" if missing else f"{spec.forbid_op} was called"
            if spec.kind == "ext":
                run.error = f"lstm_ext did not run its own operator ({why})"
            else:
                run.skipped = f"torch did not take this path for {settings.dtype} {mode} ({why})"
                _progress(f"    {spec.label}: skipped, {run.skipped}")
            continue
        results[spec.key] = result

    correctness = _correctness(work, results, names, settings.dtype)
    del results

    if settings.reps is not None:
        _progress(f"    timing {settings.reps} round(s) of {len(usable())} variant(s)")
    else:
        _progress(
            f"    timing rounds of {len(usable())} variant(s) for ~{settings.target_time:g} s "
            f"({MIN_AUTO_REPS} to {MAX_AUTO_REPS} rounds)"
        )
    def in_process() -> list[VariantRun]:
        return [run for run in usable() if run.spec.kind != "runtime"]

    def runtimes() -> list[VariantRun]:
        return [run for run in usable() if run.spec.kind == "runtime"]

    reps = 0
    timing_start = time.perf_counter()
    gc.collect()
    # As timeit does: a collection in the middle of one variant's step would bill it alone.
    gc.disable()
    try:
        while in_process() and not _enough_rounds(
            reps, time.perf_counter() - timing_start, settings
        ):
            round_start = time.perf_counter()
            for run in _rotated(in_process(), reps):
                elapsed = run.attempt(lambda run=run: timed_call(run.step, sync))
                if elapsed is not None:
                    run.times.append(elapsed)
            reps += 1
            round_seconds = time.perf_counter() - round_start
            if round_seconds > 1.0:
                _progress(f"    round {reps}: {round_seconds:.1f} s")
        # The deployment runtimes' own thread pools (OpenVINO's TBB workers, ONNX Runtime's
        # pool) stay busy for a while after a run and slowed the variant timed next by up to
        # 10x in interleaved rounds, so they get rounds of their own, as many, after the others.
        for round_index in range(reps):
            for run in _rotated(runtimes(), round_index):
                elapsed = run.attempt(lambda run=run: timed_call(run.step, sync))
                if elapsed is not None:
                    run.times.append(elapsed)
    finally:
        gc.enable()

    speedup = _speedups(runs)
    for run in runs.values():
        if run.error:
            _progress(f"    {run.spec.label}: ERROR {run.error}")
    wall = time.perf_counter() - started
    ext_times = runs[EXT.key].times
    headline = "lstm_ext -"
    if ext_times:
        headline = f"lstm_ext {_ms(bu.summarize(ext_times)['median'])} ms"
    versus = ", ".join(
        f"{runs[key].spec.label} {value['median']:.2f}x" for key, value in speedup.items()
    )
    _progress(
        f"    done in {wall:.1f} s: {headline}" + (f"; speedup over {versus}" if versus else "")
    )
    return {
        "shape": shape.as_dict(),
        "mode": mode,
        "reps": reps,
        "warmup": settings.warmup,
        "variants": {key: run.summary() for key, run in runs.items()},
        "speedup": speedup,
        "correctness": correctness,
        "wall_s": wall,
    }


def _speedups(runs: dict[str, VariantRun]) -> dict[str, dict[str, Any]]:
    """For each baseline: t_baseline / t_lstm_ext per round (paired), summarized."""
    ext_times = runs[EXT.key].times
    speedups = {}
    for key, run in runs.items():
        if key == EXT.key or not run.times or not ext_times:
            continue
        # Both lists start at round 0, so zip pairs the same rounds even if one stopped early.
        ratios = [theirs / mine for theirs, mine in zip(run.times, ext_times)]
        speedups[key] = {**bu.summarize(ratios), "ratios": ratios}
    return speedups


def _correctness(
    work: Workload,
    results: dict[str, StepResult],
    names: tuple[list[str], list[str]],
    dtype: torch.dtype,
) -> dict[str, Any]:
    """lstm_ext against every other variant; fp16/bf16 also against a float64 reference."""
    ext = results.get(EXT.key)
    record: dict[str, Any] = {"comparisons": {}, "oracle": None, "correct": None}
    if ext is None:
        return record
    verdicts = []
    for key, result in results.items():
        if key == EXT.key:
            continue
        comparison = compare(ext, result, names)
        comparison["within_tolerance"] = within_tolerance(comparison, dtype)
        verdicts.append(comparison["within_tolerance"])
        record["comparisons"][key] = comparison
    if dtype in TOLERANCES:
        record["tolerance"] = dict(zip(("atol", "rtol"), TOLERANCES[dtype]))
        record["correct"] = all(verdicts)
        failed = [key for key, c in record["comparisons"].items() if c["within_tolerance"] is False]
        if not failed or dtype == torch.float64:
            return record
        # float32 beyond tolerance: an ill-conditioned problem (the layer-norm LSTM over 100 steps
        # has gradients ~1e4 whose float32 rounding differs by ~1e-3 relative between any two
        # implementations) or a wrong result. The float64 oracle decides: lstm_ext passes if it is
        # no further from it than the baseline it disagrees with (within LOW_PRECISION_FACTOR).
        return _arbitrate_with_float64(record, work, results, names, dtype, failed)
    # Low precision: lstm_ext and torch.nn.LSTM both differ from the truth; lstm_ext must not be
    # much further from it than torch is (default torch path: the first torch variant that ran).
    oracle = float64_oracle(work)
    errors = {key: compare(result, oracle, names) for key, result in results.items()}
    torch_key = next((key for key in errors if key.startswith("torch_")), None)
    record["oracle"] = {
        "errors": {
            key: {"output": e["output_max_abs_diff"], "grad": e["grad_max_abs_diff"]}
            for key, e in errors.items()
        },
        "rule": f"lstm_ext error <= {LOW_PRECISION_FACTOR} x {torch_key} error, per group",
        "against": torch_key,
    }
    if torch_key is not None:
        ok = True
        for group in ("output_max_abs_diff", "grad_max_abs_diff"):
            mine, theirs = errors[EXT.key][group], errors[torch_key][group]
            if mine is not None and theirs is not None:
                # The floor keeps an exactly-matching torch (error 0) from failing everyone.
                floor = torch.finfo(dtype).eps * errors[torch_key]["scale"].get("output", 1.0)
                ok = ok and mine <= LOW_PRECISION_FACTOR * theirs + floor
        record["correct"] = ok
    return record


def _arbitrate_with_float64(
    record: dict[str, Any],
    work: Workload,
    results: dict[str, StepResult],
    names: tuple[list[str], list[str]],
    dtype: torch.dtype,
    failed: list[str],
) -> dict[str, Any]:
    """record["correct"] from the float64 oracle for the baselines lstm_ext disagreed with."""
    oracle = float64_oracle(work)
    errors = {key: compare(results[key], oracle, names) for key in (EXT.key, *failed)}
    ok = True
    for key in failed:
        for group in ("output_max_abs_diff", "grad_max_abs_diff"):
            mine, theirs = errors[EXT.key][group], errors[key][group]
            if mine is not None and theirs is not None:
                floor = torch.finfo(dtype).eps * errors[key]["scale"].get("output", 1.0)
                ok = ok and mine <= LOW_PRECISION_FACTOR * theirs + floor
    record["oracle"] = {
        "errors": {
            key: {"output": e["output_max_abs_diff"], "grad": e["grad_max_abs_diff"]}
            for key, e in errors.items()
        },
        "rule": f"beyond tolerance of {', '.join(failed)}: lstm_ext error <= "
                f"{LOW_PRECISION_FACTOR} x its error against float64, per group",
        "against": failed[0],
    }
    record["correct"] = ok
    return record


# ------------------------------------------------------------------------------------------------
# Reporting


def _ms(seconds: float) -> str:
    value = seconds * 1e3
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _mb(size: int) -> str:
    value = size / 2**20
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def numeric(text: str) -> bool:
        return bool(text) and (text[0].isdigit() or text[0] in "-+.") and text != "-"

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if numeric(cell) else cell.ljust(width)
            for cell, width in zip(cells, widths)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def results_table(cases: Sequence[dict[str, Any]], variants: Sequence[VariantSpec]) -> str:
    """The terminal report: one line per shape, mode and variant."""
    headers = [
        "shape",
        "mode",
        "variant",
        "reps",
        "median ms",
        "q1-q3 ms",
        "peak MB",
        "lstm_ext speedup (q1-q3)",
        "max|d| out",
        "max|d| grad",
        "note",
    ]
    rows = []
    for case in cases:
        first = True
        for spec in variants:
            record = case["variants"].get(spec.key)
            if record is None:
                continue
            stats = record["stats_s"]
            speed = case["speedup"].get(spec.key)
            comparison = case["correctness"]["comparisons"].get(spec.key)
            notes = []
            if record["compile_s"] is not None:
                notes.append(f"compile {record['compile_s']:.1f} s")
            if record["skipped"]:
                notes.append(f"skipped: {record['skipped']}")
            if record["error"]:
                notes.append(f"ERROR: {record['error']}")
            if comparison and comparison.get("within_tolerance") is False:
                notes.append("DIFF ABOVE TOLERANCE")
            if spec.key == EXT.key and case["correctness"]["oracle"]:
                verdict = case["correctness"]["correct"]
                against = case["correctness"]["oracle"]["against"] or "torch"
                notes.append(f"vs float64: {'ok' if verdict else 'WORSE THAN ' + against}")
            peak = record["peak_memory_bytes"]
            grad_diff = comparison["grad_max_abs_diff"] if comparison else None
            rows.append(
                [
                    case["shape"]["name"] if first else "",
                    case["mode"] if first else "",
                    spec.label,
                    str(len(record["times_s"])) if record["times_s"] else "-",
                    _ms(stats["median"]) if stats else "-",
                    f"{_ms(stats['q1'])}-{_ms(stats['q3'])}" if stats else "-",
                    _mb(peak) if peak is not None else "-",
                    (
                        f"{speed['median']:.2f}x ({speed['q1']:.2f}-{speed['q3']:.2f})"
                        if speed
                        else ("(baseline)" if spec.key == EXT.key else "-")
                    ),
                    f"{comparison['output_max_abs_diff']:.1e}" if comparison else "-",
                    f"{grad_diff:.1e}" if grad_diff is not None else "-",
                    "; ".join(notes),
                ]
            )
            first = False
    return format_table(headers, rows)


# Heat-map cells name their best peer by one letter.
PEER_LETTERS = {"torch_onednn": "D", "torch_native": "N", "onnxruntime": "O", "openvino": "V"}


def _grid_heat_map(plt: Any, grid: dict[str, Any]) -> Any:
    """One N x H heat map per mode of lstm_ext's speedup over the best peer (log colour scale)."""
    import matplotlib.colors

    modes = [mode for mode, part in grid.items() if part["points"]]
    figure, axes = plt.subplots(1, len(modes), figsize=(7.5 * len(modes), 6.2), squeeze=False)
    norm = matplotlib.colors.LogNorm(vmin=0.5, vmax=2.0)
    for column, mode in enumerate(modes):
        axis = axes[0][column]
        part = grid[mode]
        values = [[float("nan")] * len(GRID_HIDDENS) for _ in GRID_BATCHES]
        for point in part["points"]:
            if point["batch"] not in GRID_BATCHES or point["hidden_size"] not in GRID_HIDDENS:
                continue
            row = GRID_BATCHES.index(point["batch"])
            col = GRID_HIDDENS.index(point["hidden_size"])
            values[row][col] = point["speedup"]
            layers = " L2" if point["layers"] > 1 else ""
            letter = PEER_LETTERS.get(point["best_peer"], "?")
            axis.text(
                col, row, f"{point['speedup']:.2f} {letter}\nT{point['seq_len']}{layers}",
                ha="center", va="center", fontsize=7,
            )
        image = axis.imshow(values, cmap="RdYlGn", norm=norm, aspect="auto")
        axis.set_xticks(range(len(GRID_HIDDENS)), [str(h) for h in GRID_HIDDENS])
        axis.set_yticks(range(len(GRID_BATCHES)), [str(n) for n in GRID_BATCHES])
        axis.set_xlabel("hidden size H (= C)")
        axis.set_ylabel("batch size N")
        axis.set_title(
            f"{mode}: median {part['median_speedup']:.2f}x, min {part['min_speedup']:.2f}x",
            fontsize=10,
        )
        figure.colorbar(image, ax=axis, label="speedup over the best peer (x)")
    return figure


def write_plot(path: str, payload: dict[str, Any]) -> None:
    """PNG of lstm_ext's speedup over each baseline: per shape and mode, or against size (sweep)."""
    plt = bu.pyplot()
    cases = payload["results"]
    modes = list(dict.fromkeys(case["mode"] for case in cases))
    baselines = [key for key in payload["config"]["variants"] if key != EXT.key]
    every_spec = (*CPU_BASELINES, *CUDA_BASELINES, REFERENCE, COMPILED)
    labels = {spec.key: spec.label for spec in every_spec}
    env = payload["env"]
    title = (
        f"lstm_ext speedup, cell {payload['config'].get('cell', 'lstm')} ({env['device_name']}, "
        f"{payload['config']['dtype']}, {env['threads']} threads; >1: lstm_ext faster)"
    )
    sweep = payload.get("sweep")
    if payload.get("grid"):
        title += "\nbest peer: D torch oneDNN, N torch native, O ONNX Runtime, V OpenVINO"
        figure = _grid_heat_map(plt, payload["grid"])
    elif sweep:
        figure, axes = plt.subplots(len(modes), 2, figsize=(11, 3.6 * len(modes)), squeeze=False)
        by_name = {(case["shape"]["name"], case["mode"]): case for case in cases}
        for row, mode in enumerate(modes):
            for column, (axis_key, xlabel) in enumerate(
                (("batch", "batch size N"), ("hidden", "hidden size H (= C)"))
            ):
                axis = axes[row][column]
                part = sweep[axis_key]
                for key in baselines:
                    xs, ys, low, high = [], [], [], []
                    for value, name in zip(part["values"], part["shapes"]):
                        speed = by_name.get((name, mode), {}).get("speedup", {}).get(key)
                        if speed:
                            xs.append(value)
                            ys.append(speed["median"])
                            low.append(speed["median"] - speed["q1"])
                            high.append(speed["q3"] - speed["median"])
                    if xs:
                        axis.errorbar(
                            xs,
                            ys,
                            yerr=[low, high],
                            marker="o",
                            capsize=3,
                            label=labels.get(key, key),
                        )
                axis.axhline(1.0, color="gray", linewidth=0.8)
                axis.set_xscale("log", base=2)
                axis.set_xlabel(xlabel)
                axis.set_ylabel("speedup (x)")
                fixed = f"H={part['hidden_size']}" if axis_key == "batch" else f"N={part['batch']}"
                axis.set_title(f"{mode}, {fixed}")
                axis.legend(fontsize=8)
    else:
        figure, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
        width = 0.8 / max(1, len(baselines))
        for column, mode in enumerate(modes):
            axis = axes[0][column]
            mode_cases = [case for case in cases if case["mode"] == mode]
            for index, key in enumerate(baselines):
                xs, ys, low, high = [], [], [], []
                for position, case in enumerate(mode_cases):
                    speed = case["speedup"].get(key)
                    if speed:
                        xs.append(position + (index - (len(baselines) - 1) / 2) * width)
                        ys.append(speed["median"])
                        low.append(speed["median"] - speed["q1"])
                        high.append(speed["q3"] - speed["median"])
                if xs:
                    axis.bar(xs, ys, width, yerr=[low, high], capsize=3, label=labels.get(key, key))
            axis.axhline(1.0, color="gray", linewidth=0.8)
            axis.set_xticks(range(len(mode_cases)))
            axis.set_xticklabels(
                [case["shape"]["name"].replace(" C", "\nC") for case in mode_cases], fontsize=8
            )
            axis.set_ylabel("speedup (x)")
            axis.set_title(mode)
            axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 if every variant ran and lstm_ext matched every baseline, else 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    bu.silence_known_warnings()

    unknown_modes = [mode for mode in args.modes if mode not in MODES]
    if unknown_modes or not args.modes:
        parser.error(f"--modes takes {', '.join(MODES)}; got {','.join(args.modes)}")
    if args.warmup < 0 or (args.reps is not None and args.reps < 1) or args.layers < 1:
        parser.error("--warmup must be >= 0, --reps and --layers >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.busy < 0:
        parser.error("--busy must be >= 0")
    if args.plot and not bu.require_matplotlib():
        return 2
    device, problem = bu.select_device(args.device)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    assert device is not None
    dtype = DTYPES[args.dtype]

    variants = available_variants(device, args.compile, args.cell)
    if args.variants is not None:
        known = {spec.key for spec in variants}
        unknown = [key for key in args.variants if key not in known]
        if unknown:
            parser.error(
                f"unknown variant(s) {', '.join(unknown)} for {device.type}: choose from "
                f"{', '.join(sorted(known))} (reference_compiled needs --compile)"
            )
        variants = [spec for spec in variants if spec.key == EXT.key or spec.key in args.variants]
    elif args.grid:
        # The reference is the slowest variant by far at T = 500 and no peer a user deploys.
        variants = [spec for spec in variants if spec.kind != "reference"]
    if args.target_time is None:
        args.target_time = GRID_TARGET_SECONDS if args.grid else DEFAULT_TARGET_SECONDS
    shapes, sweep = resolve_shapes(args, parser)

    previous_threads = torch.get_num_threads()
    previous_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # --busy: the load, started before anything is timed and stopped whatever happens.
    load = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
    ]
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        # Off by default so that "float32" is float32 on every path (cuDNN's RNNs use TF32 by
        # default, cuBLAS does not); --allow-tf32 turns it on for all of them alike.
        torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.allow_tf32
        return _run(args, device, dtype, variants, shapes, sweep)
    finally:
        for process in load:
            process.kill()
            process.wait()
        torch.set_num_threads(previous_threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous_tf32


def _run(
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    variants: list[VariantSpec],
    shapes: list[Shape],
    sweep: dict[str, Any] | None,
) -> int:
    started = time.perf_counter()
    env = bu.environment(str(device))
    print(bu.format_environment(env), flush=True)
    warning = bu.busy_machine_warning(env)
    if args.busy:
        print(f"load        {args.busy} busy-loop process(es) running throughout (--busy)",
              flush=True)
    elif warning:
        print(warning, flush=True)
    reps_text = (
        str(args.reps)
        if args.reps is not None
        else (f"auto ({MIN_AUTO_REPS}-{MAX_AUTO_REPS}, ~{args.target_time:g} s per shape and mode)")
    )
    print(
        f"method      {args.cell}, {args.dtype}; "
        f"variants {', '.join(spec.key for spec in variants)}; "
        f"warm-up {args.warmup}, reps {reps_text}; interleaved round-robin",
        flush=True,
    )
    settings = Settings(
        device=device,
        dtype=dtype,
        seed=args.seed,
        warmup=args.warmup,
        reps=args.reps,
        target_time=args.target_time,
        compile_backend=args.compile_backend,
        cell=args.cell,
    )
    cases = []
    count = len(shapes) * len(args.modes)
    for index, (shape, mode) in enumerate(itertools.product(shapes, args.modes)):
        cases.append(run_case(shape, mode, variants, settings, f"[{index + 1}/{count}]"))
    total = time.perf_counter() - started

    errors = [
        (case["shape"]["name"], case["mode"], key, record["error"])
        for case in cases
        for key, record in case["variants"].items()
        if record["error"]
    ]
    incorrect = [
        (case["shape"]["name"], case["mode"])
        for case in cases
        if case["correctness"]["correct"] is False
    ]
    ok = not errors and not incorrect

    print()
    print(
        f"Results: {args.dtype} on {device} ({env['device_name']}), {env['threads']} threads.\n"
        "  median, q1-q3: per-step times over the interleaved rounds.\n"
        "  speedup: median over rounds of t_variant / t_lstm_ext in the same round "
        "(>1: lstm_ext is faster).\n"
        "  max|d|: lstm_ext's max abs difference from that variant's output, h_n, c_n (out) "
        "and gradients of input and all parameters (grad).\n"
        "  peak MB: memory a step allocates beyond its inputs (benchmarks/README.md)."
    )
    print(results_table(cases, variants))
    print(f"\ntotal wall time {total:.1f} s")
    for shape_name, mode, key, error in errors:
        print(f"ERROR {shape_name} {mode} {key}: {error}")
    for shape_name, mode in incorrect:
        print(f"MISMATCH {shape_name} {mode}: lstm_ext differs from a baseline beyond tolerance")

    config = {
        **{key: value for key, value in vars(args).items() if key not in ("json", "plot")},
        "device": str(device),
        "dtype": args.dtype,
        "variants": [spec.key for spec in variants],
        "shapes": [shape.as_dict() for shape in shapes],
        "min_auto_reps": MIN_AUTO_REPS,
        "max_auto_reps": MAX_AUTO_REPS,
    }
    grid = grid_summary(cases) if args.grid else None
    if grid:
        for mode, part in grid.items():
            if part["median_speedup"] is None:
                continue
            below = ", ".join(part["below_1x"]) or "none"
            print(
                f"grid {mode}: lstm_ext against the best peer per point: median "
                f"{part['median_speedup']:.2f}x, min {part['min_speedup']:.2f}x over "
                f"{len(part['points'])} points; below 1.0x: {below}"
            )
    payload = {
        "schema": SCHEMA,
        "env": env,
        "config": config,
        "sweep": sweep,
        "grid": grid,
        "results": cases,
        "total_wall_s": total,
        "ok": ok,
    }
    if args.json:
        json_path = bu.result_path(args.json, env)
        bu.write_json(json_path, payload)
        print(f"wrote {json_path}")
    if args.plot:
        write_plot(args.plot, payload)
        print(f"wrote {args.plot}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
