"""lstm_ext.LSTM under DistributedDataParallel: two CPU processes (gloo) give the gradients of one
process training on the same global batch.

The two workers are fresh interpreters started with subprocess (no fork: forking a process that
has started threads, as torch's compile machinery does, can hang the child at exit). They
rendezvous through a file:// init method and each run two training steps on its half of the batch
(two, so the optimizer steps agree too); this process computes the single-process reference
meanwhile, from the same module file.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import os
    import sys

    import torch

    import lstm_ext

    WORLD, STEPS, BATCH = 2, 2, 8


    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm_ext.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=4)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x):
            output, (h_n, c_n) = self.lstm(x)
            return self.head(output).squeeze(-1).mean(0) + h_n.sum((0, 2)) + c_n.mean((0, 2))


    def data(step):
        generator = torch.Generator().manual_seed(100 + step)
        x = torch.randn(5, BATCH, 3, dtype=torch.float64, generator=generator)
        y = torch.randn(BATCH, dtype=torch.float64, generator=generator)
        return x, y


    def train(model, rank, world):
        # Each rank's loss is the mean over its shard; DDP averages the ranks' gradients, which
        # is the gradient of the mean over the global batch.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        shard = BATCH // world
        grads = []
        for step in range(STEPS):
            x, y = data(step)
            x, y = x[:, rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]
            optimizer.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
        return grads


    if __name__ == "__main__":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        rank, out_dir = int(sys.argv[1]), sys.argv[2]
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"),
                                rank=rank, world_size=WORLD)
        torch.manual_seed(0)
        model = DistributedDataParallel(Model().double())
        grads = train(model, rank, WORLD)
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    """
)


def test_ddp_two_processes_match_single_process(tmp_path):
    script = tmp_path / "ddp_lstm.py"
    script.write_text(WORKER)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    workers = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    spec = importlib.util.spec_from_file_location("ddp_lstm", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    expected = module.train(module.Model().double(), 0, 1)
    try:
        results = [worker.communicate(timeout=120) for worker in workers]
    finally:
        # A worker left running (timeout, or its peer failed) must not outlive the test.
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for rank, (worker, (_, stderr)) in enumerate(zip(workers, results)):
        assert worker.returncode == 0, f"rank {rank}: {stderr[-3000:]}"
        actual = torch.load(tmp_path / f"rank{rank}.pt")
        for step_actual, step_expected in zip(actual, expected, strict=True):
            for a, e in zip(step_actual, step_expected, strict=True):
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
