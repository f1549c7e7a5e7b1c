"""lstm_ext: fused LSTM kernels for PyTorch, with drop-in ``LSTM`` and ``LSTMCell`` modules.

    import lstm_ext
    lstm = lstm_ext.LSTM(input_size=512, hidden_size=512, num_layers=2)   # as torch.nn.LSTM
    output, (h_n, c_n) = lstm(x)

``lstm_ext.build_info()`` tells which backends were compiled in.
"""

from __future__ import annotations

# torch first: it loads libc10/libtorch, which the compiled library links against.
import torch

try:
    from lstm_ext import _C
except ImportError as error:
    raise ImportError(
        "lstm_ext: the compiled library lstm_ext._C could not be loaded "
        f"({error}). Build it from the source tree with "
        "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`), "
        "against the torch you run with."
    ) from error

from lstm_ext import functional, ops, reference
from lstm_ext.modules import LSTM, LSTMCell

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "LSTMCell",
    "build_info",
    "compiled_backends",
    "functional",
    "ops",
    "reference",
]


def compiled_backends() -> tuple[str, ...]:
    """The devices lstm_ext has kernels for in this build: ``("cpu",)`` or ``("cpu", "cuda")``."""
    return ("cpu", "cuda") if _C.with_cuda else ("cpu",)


def build_info() -> dict[str, object]:
    """How this lstm_ext was built and what it runs on: version, backends, CUDA archs, CPU path."""
    return {
        "version": __version__,
        "backends": compiled_backends(),
        "cuda_archs": _C.cuda_archs or None,
        "cpu_capability": _C.cpu_capability(),
        "torch": torch.__version__,
    }
