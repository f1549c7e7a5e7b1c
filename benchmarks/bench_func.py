"""Time what torch.func and higher-order autograd cost with lstm_ext against torch.nn.LSTM.

Workloads (each lstm_ext variant beside torch's ways of computing the same thing, interleaved in
rounds; medians, paired speedups, and the max abs difference from torch's result):

- per-sample gradients: ``vmap(grad(loss))`` over B sequences (differential privacy, Opacus);
  torch.nn.LSTM under the same vmap (torch runs it through its slow batching fallback) and in a
  Python loop over the samples.
- gradient penalty: loss + ||d loss / d x||^2, backward through it (WGAN-GP, double backward);
  torch.nn.LSTM's native path (oneDNN has no double backward, cuDNN none either).
- vmap over a batch of batches (inference): one vmapped call against a loop over torch.nn.LSTM.

Speed is measured here, never asserted in tests. Shapes: ``T`` time, ``N`` batch, ``C`` input,
``H`` hidden, ``B`` the vmapped dimension.

    python benchmarks/bench_func.py [--shape T,N,C,H] [--samples B] [--layers L] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import _bench_utils as utils
import torch
from torch.func import functional_call, grad, vmap

import lstm_ext

Workload = dict[str, Callable[[], Any]]


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


def per_sample_gradients(ours, theirs, xs: torch.Tensor) -> Workload:
    """Each variant returns the per-sample gradient of weight_hh_l0, [B, 4H, H]."""

    def loss(module):
        def f(params, x):
            out, _ = functional_call(module, params, (x,))
            return out[-1].square().sum()

        return f

    def vmapped(module):
        return lambda: vmap(grad(loss(module)), in_dims=(None, 0))(_params(module), xs)[
            "weight_hh_l0"
        ]

    def loop():
        grads = []
        for x in xs:
            out, _ = theirs(x)
            grads.append(torch.autograd.grad(out[-1].square().sum(), theirs.weight_hh_l0)[0])
        return torch.stack(grads)

    return {
        "lstm_ext vmap(grad)": vmapped(ours),
        "torch.nn.LSTM vmap(grad)": vmapped(theirs),
        "torch.nn.LSTM loop": loop,
    }


def gradient_penalty(ours, theirs, x: torch.Tensor) -> Workload:
    """Each variant returns the gradient of the penalized loss w.r.t. weight_hh_l0."""

    def step(module):
        def run():
            inp = x.clone().requires_grad_()
            out, _ = module(inp)
            loss = out.square().mean()
            (grad_x,) = torch.autograd.grad(loss, inp, create_graph=True)
            total = loss + grad_x.square().sum()
            return torch.autograd.grad(total, module.weight_hh_l0)[0]

        return run

    return {"lstm_ext": step(ours), "torch.nn.LSTM": step(theirs)}


def vmap_inference(ours, theirs, xs: torch.Tensor) -> Workload:
    def vmapped():
        with torch.no_grad():
            return vmap(lambda x: ours(x)[0])(xs)

    def loop():
        with torch.no_grad():
            return torch.stack([theirs(x)[0] for x in xs])

    return {"lstm_ext vmap": vmapped, "torch.nn.LSTM loop": loop}


def time_workload(workload: Workload, rounds: int, warmup: int) -> dict[str, Any]:
    """Interleaved rounds (order rotated each round), after warm-up; medians in ms."""
    names = list(workload)
    results = {name: workload[name]() for name in names}
    for _ in range(warmup):
        for name in names:
            workload[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            workload[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    baseline = names[0]
    report = {}
    for name in names:
        paired = [t / b for t, b in zip(times[name], times[baseline])]
        reference = results[names[-1]]
        report[name] = {
            "ms": utils.summarize(times[name]),
            "speedup_of_lstm_ext": statistics.median(paired),
            "max_abs_diff_from_torch": float((results[name] - reference).abs().max()),
            "times_ms": times[name],
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="50,1,64,64", help="T,N,C,H (default: 50,1,64,64)")
    parser.add_argument("--samples", type=int, default=32, help="B, the vmapped dimension")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)
    utils.silence_known_warnings()
    # torch.nn.LSTM under vmap warns that its op has no batching rule: that slow fallback is what
    # this benchmark measures, and says so in the variant's name.
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not")
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, batch, features, hidden = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(features, hidden, num_layers=args.layers)
    ours = lstm_ext.LSTM.from_torch(theirs)
    env = utils.environment("cpu")
    print(utils.format_environment(env))
    warning = utils.busy_machine_warning(env)
    if warning:
        print(warning)
    print(
        f"shape T={steps} N={batch} C={features} H={hidden}, layers {args.layers}, "
        f"B={args.samples} vmapped samples, float32, {args.rounds} rounds\n"
    )
    xs = torch.randn(args.samples, steps, batch, features)
    workloads = {
        "per-sample gradients": per_sample_gradients(ours, theirs, xs),
        "gradient penalty (double backward)": gradient_penalty(ours, theirs, xs[0]),
        "vmap inference over B batches": vmap_inference(ours, theirs, xs),
    }
    results: dict[str, Any] = {}
    for title, workload in workloads.items():
        report = time_workload(workload, args.rounds, args.warmup)
        results[title] = report
        print(title)
        first = next(iter(report))
        for name, entry in report.items():
            speedup = entry["speedup_of_lstm_ext"]
            vs = "" if name == first else f"  lstm_ext {speedup:5.2f}x (paired; >1: faster)"
            print(
                f"  {name:26s} {entry['ms']['median']:10.2f} ms  "
                f"(max |diff| from torch {entry['max_abs_diff_from_torch']:.1e}){vs}"
            )
        print()
    if args.json:
        utils.write_json(
            args.json,
            {
                "environment": env,
                "shape": [steps, batch, features, hidden],
                "layers": args.layers,
                "samples": args.samples,
                "results": results,
            },
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
