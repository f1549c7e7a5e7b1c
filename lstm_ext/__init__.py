"""lstm_ext: fused LSTM and GRU kernels for PyTorch, with drop-in ``LSTM``, ``LSTMCell``, ``GRU``
and ``GRUCell`` modules.

    import lstm_ext
    lstm = lstm_ext.LSTM(input_size=512, hidden_size=512, num_layers=2)   # as torch.nn.LSTM
    output, (h_n, c_n) = lstm(x)
    gru = lstm_ext.GRU(input_size=512, hidden_size=512, num_layers=2)     # as torch.nn.GRU
    output, h_n = gru(x)

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

from lstm_ext import functional, onnx, ops, reference
from lstm_ext.modules import GRU, LSTM, GRUCell, LSTMCell

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "build_info",
    "compiled_backends",
    "empty_cpu_cache",
    "functional",
    "onnx",
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


def empty_cpu_cache() -> int:
    """Frees the idle blocks of lstm_ext's CPU buffer cache and returns how many bytes that freed.

    Buffers of 16 MiB and more that the CPU kernels keep between forward and backward (saved gates
    and cell states) or use inside backward (gradients of the gates) come from a cache of blocks,
    because fresh pages cost more than the work on them; a block freed by its last tensor waits
    there for the next call, as in PyTorch's CUDA caching allocator. At most
    ``LSTM_EXT_CPU_CACHE_MB`` MiB (default 1024; 0 turns the cache off) stay idle.
    """
    return _C.empty_cpu_cache()
