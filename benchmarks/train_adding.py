"""End-to-end training on the adding problem: ``lstm_ext.LSTM`` against ``torch.nn.LSTM``.

    python benchmarks/train_adding.py                    # CPU, a couple of minutes
    python benchmarks/train_adding.py --device cuda --seq-len 200 --steps 3000 --plot adding.png

The adding problem (Hochreiter & Schmidhuber, 1997): each sequence has two channels, random values
in [0, 1) and a marker that is 1 at exactly two steps, one in each half of the sequence; the target
is the sum of the two marked values. Predicting the mean (1.0) gives an MSE of Var(u1 + u2) =
2/12 ~ 0.167: a model that cannot carry information across the sequence stays there.

Three models with the same architecture (recurrent layer, then a linear head on the last output)
train in lockstep on the same batches with the same optimizer:

* ``lstm_ext``: ``lstm_ext.LSTM``, starting from the exact weights of
* ``torch``: ``torch.nn.LSTM``. The two must agree, or the script exits nonzero: their losses
  over the first ``--check-steps`` steps to ``--tolerance``, and the outcome (final loss,
  held-out MSE) to ``--final-tolerance``. In between, when the loss falls off its plateau,
  training is unstable and float32 rounding differences grow into visibly different curves for a
  while; that is the optimizer's sensitivity, not a bug, and the report says where it starts.
* ``rnn``: a plain ``torch.nn.RNN`` (tanh), the contrast: its gradients vanish over long
  sequences and its loss stays near 0.167 while the LSTMs' drops.
* ``--cells`` (default: all of them): the other cells lstm_ext offers, on the same batches and
  from the same seed: ``gru`` (``lstm_ext.GRU``) and the LSTM variants ``peephole``, ``cifg``
  (coupled input and forget gates), ``layernorm`` and ``zoneout`` (``lstm_ext.LSTM`` with that
  option), so that each cell's standing on the task is measured side by side.

Per step, each model's time (forward, backward, gradient clipping, optimizer step) is measured,
in a rotating order, so the lstm_ext/torch speedup comes from pairs of steps on the same batch.

Shapes: ``T`` time, ``N`` batch, ``H`` hidden size; inputs are ``[T, N, 2]``, targets ``[N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# _bench_utils also makes an in-place build of lstm_ext importable, so it comes before lstm_ext.
import _bench_utils as bu
import torch
from torch import Tensor, nn

import lstm_ext

SCHEMA = "lstm_ext.train_adding/1"
# MSE of always predicting E[u1 + u2] = 1: Var(u1 + u2) for two independent U(0, 1).
BASELINE_MSE = 2.0 / 12.0
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def adding_batch(
    generator: torch.Generator,
    seq_len: int,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """One batch of the adding problem: inputs ``[T, N, 2]`` and targets ``[N]``.

    Drawn on the CPU from ``generator`` and then moved, so every device sees the same numbers.
    """
    if seq_len < 2:
        raise ValueError(f"the adding problem needs seq_len >= 2, got {seq_len}")
    values = torch.rand(seq_len, batch, generator=generator, dtype=torch.float64)
    half = seq_len // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, seq_len, (batch,), generator=generator)
    columns = torch.arange(batch)
    markers = torch.zeros(seq_len, batch, dtype=torch.float64)
    markers[first, columns] = 1.0
    markers[second, columns] = 1.0
    inputs = torch.stack([values, markers], dim=2)
    targets = values[first, columns] + values[second, columns]
    return inputs.to(device, dtype), targets.to(device, dtype)


class AddingModel(nn.Module):
    """A recurrent layer and a linear head reading its last output: ``[T, N, 2]`` -> ``[N]``."""

    def __init__(self, recurrent: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.recurrent = recurrent
        self.head = nn.Linear(
            hidden_size, 1, device=_device_of(recurrent), dtype=_dtype_of(recurrent)
        )

    def forward(self, inputs: Tensor) -> Tensor:
        output, _ = self.recurrent(inputs)
        return self.head(output[-1]).squeeze(-1)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# --cells: the extra models, each a function of (hidden size, factory kwargs).
EXTRA_CELLS: dict[str, Callable[..., nn.Module]] = {
    "gru": lambda hidden, **options: lstm_ext.GRU(2, hidden, **options),
    "peephole": lambda hidden, **options: lstm_ext.LSTM(2, hidden, peephole=True, **options),
    "cifg": lambda hidden, **options: lstm_ext.LSTM(2, hidden, coupled_gates=True, **options),
    "layernorm": lambda hidden, **options: lstm_ext.LSTM(2, hidden, layer_norm=True, **options),
    "zoneout": lambda hidden, **options: lstm_ext.LSTM(2, hidden, zoneout=0.1, **options),
}
LABELS = {
    "lstm_ext": "lstm_ext.LSTM",
    "torch": "torch.nn.LSTM",
    "rnn": "torch.nn.RNN (tanh)",
    "gru": "lstm_ext.GRU",
    "peephole": "LSTM, peepholes",
    "cifg": "LSTM, coupled gates",
    "layernorm": "LSTM, layer norm",
    "zoneout": "LSTM, zoneout 0.1",
}


def build_models(
    hidden_size: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    with_rnn: bool,
    cells: list[str] = (),
) -> dict[str, AddingModel]:
    """The models to train; lstm_ext's starts from a copy of torch's state_dict."""
    options: dict[str, Any] = {"device": device, "dtype": dtype}
    torch.manual_seed(seed)
    models = {"torch": AddingModel(nn.LSTM(2, hidden_size, **options), hidden_size)}
    models["lstm_ext"] = AddingModel(lstm_ext.LSTM(2, hidden_size, **options), hidden_size)
    models["lstm_ext"].load_state_dict(models["torch"].state_dict())
    if with_rnn:
        torch.manual_seed(seed)
        rnn = nn.RNN(2, hidden_size, nonlinearity="tanh", **options)
        models["rnn"] = AddingModel(rnn, hidden_size)
    for cell in cells:
        torch.manual_seed(seed)
        models[cell] = AddingModel(EXTRA_CELLS[cell](hidden_size, **options), hidden_size)
    return models


def _cell_list(text: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    cells = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in cells if name not in EXTRA_CELLS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown cell(s) {', '.join(unknown)}: choose from {', '.join(EXTRA_CELLS)} or none"
        )
    return cells


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Train the same LSTM on the adding problem with lstm_ext.LSTM and torch.nn.LSTM "
            "(same seed, weights and batches): time per step and loss curves, which must agree; "
            "a tanh RNN shows the vanishing-gradient failure for contrast."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<index>")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--seq-len", type=int, default=50, help="T, the sequence length")
    parser.add_argument("--batch-size", type=int, default=64, help="N")
    parser.add_argument("--hidden-size", type=int, default=64, help="H")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batches")
    parser.add_argument(
        "--check-steps",
        type=int,
        default=100,
        help="the first N steps, where the two LSTM loss curves must agree to --tolerance",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest allowed |loss_lstm_ext - loss_torch| in the first --check-steps steps "
        "(default: 1e-4 for float32, 1e-9 for float64)",
    )
    parser.add_argument(
        "--final-tolerance",
        type=float,
        default=0.02,
        help="largest allowed difference of the final training loss and of the held-out MSE",
    )
    parser.add_argument("--eval-size", type=int, default=1000, help="held-out sequences")
    parser.add_argument("--log-every", type=int, default=100, help="progress line every N steps")
    parser.add_argument("--no-rnn", action="store_true", help="skip the tanh RNN contrast")
    parser.add_argument(
        "--cells",
        type=_cell_list,
        default=list(EXTRA_CELLS),
        help=f"the other cells to train alongside (comma-separated from {', '.join(EXTRA_CELLS)}, "
        "or none)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="write results as JSON; a folder gets a file named by device and date",
    )
    parser.add_argument(
        "--plot", metavar="PATH", default=None, help="write a PNG of the loss curves (matplotlib)"
    )
    return parser


def train(
    models: dict[str, AddingModel],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None],
) -> dict[str, dict[str, list[float]]]:
    """Train every model in lockstep; per model, the loss and the time of each step."""
    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )
    optimizers = {
        name: torch.optim.Adam(model.parameters(), lr=args.lr) for name, model in models.items()
    }
    history: dict[str, dict[str, list[float]]] = {
        name: {"loss": [], "step_s": []} for name in models
    }
    generator = torch.Generator().manual_seed(args.seed)
    names = list(models)
    started = time.perf_counter()
    for step in range(args.steps):
        inputs, targets = adding_batch(generator, args.seq_len, args.batch_size, device, dtype)
        # Rotate who goes first, so that no model always runs with a cold (or warm) cache.
        order = names[step % len(names) :] + names[: step % len(names)]
        for name in order:
            model, optimizer = models[name], optimizers[name]
            sync()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            sync()
            history[name]["step_s"].append(time.perf_counter() - start)
            history[name]["loss"].append(loss.item())
        if args.log_every > 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            window = min(args.log_every, step + 1)
            recent = ", ".join(
                f"{name} {statistics.fmean(history[name]['loss'][-window:]):.4f}" for name in names
            )
            log(
                f"step {step + 1:>5}/{args.steps}  mean loss of the last {window}: {recent}  "
                f"({time.perf_counter() - started:.0f} s)"
            )
    return history


@torch.no_grad()
def evaluate(
    models: dict[str, AddingModel],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """MSE of every model on one held-out batch (its own generator: never seen in training)."""
    generator = torch.Generator().manual_seed(args.seed + 1_000_003)
    inputs, targets = adding_batch(generator, args.seq_len, args.eval_size, device, dtype)
    result = {}
    for name, model in models.items():
        model.eval()
        result[name] = nn.functional.mse_loss(model(inputs), targets).item()
        model.train()
    return result


def summarize_run(
    history: dict[str, dict[str, list[float]]],
    eval_mse: dict[str, float],
    check_steps: int,
    tolerance: float,
    final_tolerance: float,
) -> dict[str, Any]:
    """Per-model figures, the paired speedup and the agreement of the two LSTM loss curves.

    Agreement is judged in two parts. Over the first ``check_steps`` steps the curves must agree
    to ``tolerance``: with the same weights and batches, a wrong forward or gradient shows there
    at once. Later, training turns unstable (the loss falls off its plateau), which amplifies
    rounding differences, so float32 curves legitimately separate for a while; there only the
    outcome is held to ``final_tolerance``: final loss and held-out MSE.
    """
    models: dict[str, Any] = {}
    for name, record in history.items():
        losses = record["loss"]
        tail = losses[-max(1, len(losses) // 10) :]
        models[name] = {
            "step_ms": {key: value * 1e3 for key, value in bu.summarize(record["step_s"]).items()},
            "total_s": sum(record["step_s"]),
            "first_loss": losses[0],
            "final_loss": statistics.fmean(tail),
            "eval_mse": eval_mse[name],
        }
    ratios = [
        theirs / mine
        for theirs, mine in zip(history["torch"]["step_s"], history["lstm_ext"]["step_s"])
    ]
    diffs = [
        abs(mine - theirs)
        for mine, theirs in zip(history["lstm_ext"]["loss"], history["torch"]["loss"])
    ]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    checked = diffs[:check_steps]
    separated = next((step for step, diff in enumerate(diffs) if diff > tolerance), None)
    final_diff = abs(models["lstm_ext"]["final_loss"] - models["torch"]["final_loss"])
    eval_diff = abs(eval_mse["lstm_ext"] - eval_mse["torch"])
    early_ok = max(checked) <= tolerance
    outcome_ok = final_diff <= final_tolerance and eval_diff <= final_tolerance
    return {
        "models": models,
        "speedup_vs_torch": bu.summarize(ratios),
        "loss_agreement": {
            "check_steps": len(checked),
            "max_abs_diff_checked": max(checked),
            "tolerance": tolerance,
            "max_abs_diff": diffs[worst],
            "at_step": worst + 1,
            "mean_abs_diff": statistics.fmean(diffs),
            "first_step_above_tolerance": None if separated is None else separated + 1,
            "final_loss_abs_diff": final_diff,
            "eval_mse_abs_diff": eval_diff,
            "final_tolerance": final_tolerance,
            "ok": early_ok and outcome_ok,
        },
    }


def format_summary(summary: dict[str, Any], args: argparse.Namespace) -> str:
    headers = [
        "model",
        "median ms/step",
        "q1-q3 ms",
        "total s",
        "first loss",
        "final loss",
        "held-out MSE",
    ]
    labels = LABELS
    rows = []
    for name, record in summary["models"].items():
        step = record["step_ms"]
        rows.append(
            [
                labels.get(name, name),
                f"{step['median']:.2f}",
                f"{step['q1']:.2f}-{step['q3']:.2f}",
                f"{record['total_s']:.1f}",
                f"{record['first_loss']:.4f}",
                f"{record['final_loss']:.4f}",
                f"{record['eval_mse']:.4f}",
            ]
        )
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(headers, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    speed = summary["speedup_vs_torch"]
    agreement = summary["loss_agreement"]
    lines += [
        f"(final loss: mean of the last 10% of steps; predicting the mean scores "
        f"{BASELINE_MSE:.4f})",
        f"lstm_ext speedup over torch.nn.LSTM per training step: {speed['median']:.2f}x "
        f"(q1-q3 {speed['q1']:.2f}-{speed['q3']:.2f}, paired over {args.steps} steps)",
        f"loss curves, first {agreement['check_steps']} steps: max |lstm_ext - torch| = "
        f"{agreement['max_abs_diff_checked']:.2e} (tolerance {agreement['tolerance']:.0e}): "
        + ("OK" if agreement["max_abs_diff_checked"] <= agreement["tolerance"] else "DIVERGED"),
        f"whole run: max |lstm_ext - torch| = {agreement['max_abs_diff']:.2e} at step "
        f"{agreement['at_step']}, mean {agreement['mean_abs_diff']:.2e}"
        + (
            f"; first above {agreement['tolerance']:.0e} at step "
            f"{agreement['first_step_above_tolerance']} (rounding differences grow while the "
            "loss falls off its plateau)"
            if agreement["first_step_above_tolerance"] is not None
            else ""
        ),
        f"outcome: final loss differs by {agreement['final_loss_abs_diff']:.2e}, held-out MSE "
        f"by {agreement['eval_mse_abs_diff']:.2e} (tolerance {agreement['final_tolerance']:g}): "
        + (
            "OK"
            if max(agreement["final_loss_abs_diff"], agreement["eval_mse_abs_diff"])
            <= agreement["final_tolerance"]
            else "DIVERGED"
        ),
    ]
    return "\n".join(lines)


def write_plot(path: str, payload: dict[str, Any]) -> None:
    """PNG: the training loss of each model against the step (log scale), and the 1/6 baseline."""
    plt = bu.pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, curve in payload["losses"].items():
        label, style = LABELS.get(name, name), "--" if name == "lstm_ext" else "-"
        axis.plot(range(1, len(curve) + 1), curve, style, linewidth=1, label=label)
    axis.axhline(
        BASELINE_MSE, color="gray", linewidth=0.8, linestyle=":", label="predict the mean (1/6)"
    )
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training MSE")
    config = payload["config"]
    axis.set_title(
        f"adding problem, T={config['seq_len']}, N={config['batch_size']}, "
        f"H={config['hidden_size']} ({payload['env']['device_name']})",
        fontsize=10,
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Train, report; 0 if the lstm_ext and torch loss curves agree within the tolerance."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in ("seq_len", "batch_size", "hidden_size", "steps", "eval_size", "check_steps"):
        if getattr(args, option) < (2 if option == "seq_len" else 1):
            parser.error(f"--{option.replace('_', '-')} is too small: {getattr(args, option)}")
    if args.plot and not bu.require_matplotlib():
        return 2
    device, problem = bu.select_device(args.device)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    assert device is not None
    dtype = DTYPES[args.dtype]
    tolerance = args.tolerance
    if tolerance is None:
        tolerance = 1e-4 if dtype == torch.float32 else 1e-9

    previous_threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        env = bu.environment(str(device))
        print(bu.format_environment(env), flush=True)
        warning = bu.busy_machine_warning(env)
        if warning:
            print(warning, flush=True)
        print(
            f"task        adding problem, T={args.seq_len}, N={args.batch_size}, "
            f"H={args.hidden_size}, {args.steps} steps of Adam(lr={args.lr}), clip {args.clip}, "
            f"{args.dtype}, seed {args.seed}",
            flush=True,
        )
        models = build_models(
            args.hidden_size, device, dtype, args.seed, not args.no_rnn, args.cells
        )

        def log(message: str) -> None:
            print(message, file=sys.stderr, flush=True)

        started = time.perf_counter()
        history = train(models, args, device, dtype, log)
        eval_mse = evaluate(models, args, device, dtype)
        wall = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)

    summary = summarize_run(history, eval_mse, args.check_steps, tolerance, args.final_tolerance)
    print()
    print(format_summary(summary, args))
    print(f"total wall time {wall:.1f} s")
    if "rnn" in summary["models"]:
        rnn_final = summary["models"]["rnn"]["final_loss"]
        lstm_final = summary["models"]["torch"]["final_loss"]
        print(
            f"contrast: the tanh RNN ends at {rnn_final:.4f} ({rnn_final / BASELINE_MSE:.2f} of "
            f"the predict-the-mean level), the LSTM at {lstm_final:.4f} "
            f"({lstm_final / BASELINE_MSE:.3f})"
        )

    payload = {
        "schema": SCHEMA,
        "env": env,
        "config": {key: value for key, value in vars(args).items() if key not in ("json", "plot")}
        | {"tolerance": tolerance, "baseline_mse": BASELINE_MSE},
        "summary": summary,
        "losses": {name: record["loss"] for name, record in history.items()},
        "step_s": {name: record["step_s"] for name, record in history.items()},
        "total_wall_s": wall,
    }
    if args.json:
        json_path = bu.result_path(args.json, env, prefix="adding-")
        bu.write_json(json_path, payload)
        print(f"wrote {json_path}")
    if args.plot:
        write_plot(args.plot, payload)
        print(f"wrote {args.plot}")
    if not summary["loss_agreement"]["ok"]:
        print(
            "FAILED: the lstm_ext and torch.nn.LSTM loss curves diverged beyond the tolerance",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
