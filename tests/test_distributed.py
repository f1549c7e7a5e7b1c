"""lstm_ext.LSTM under DistributedDataParallel: two CPU processes (gloo) give the gradients of one
process training on the same global batch.

A script in a subprocess forks the two workers before it has run any parallel region (forking a
process whose OpenMP pool has started, like pytest's, can hang the child; fork rather than spawn
saves each worker importing torch again). They rendezvous through a file:// init method and each
run two training steps on its half of the batch (two, so the optimizer steps agree too).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import os
    import sys

    import torch
    import torch._dynamo  # noqa: F401  DDP imports it lazily: once here, not in each forked worker
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch.nn.parallel import DistributedDataParallel

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


    def worker(rank, init_file, out_dir):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=WORLD)
        torch.manual_seed(0)
        model = DistributedDataParallel(Model().double())
        grads = train(model, rank, WORLD)
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


    if __name__ == "__main__":
        out_dir = sys.argv[1]
        mp.start_processes(worker, args=(os.path.join(out_dir, "rendezvous"), out_dir),
                           nprocs=WORLD, start_method="fork")
        torch.manual_seed(0)
        expected = train(Model().double(), 0, 1)
        for rank in range(WORLD):
            actual = torch.load(os.path.join(out_dir, f"rank{rank}.pt"))
            for step_actual, step_expected in zip(actual, expected, strict=True):
                for a, e in zip(step_actual, step_expected, strict=True):
                    torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
        print("ok")
    """
)


def test_ddp_two_processes_match_single_process(tmp_path):
    script = tmp_path / "ddp_lstm.py"
    script.write_text(SCRIPT)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "ok"
