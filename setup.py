"""Build lstm_ext: fused LSTM operators for PyTorch (C++ on CPU, CUDA on GPU).

Install with `pip install --no-build-isolation -e .` (build isolation would compile against a
different torch than the one installed, and the extension would not load).

Environment switches:
  USE_CUDA=0            never build the CUDA kernels
  FORCE_CUDA=1          build them even if the checks below say no
  TORCH_CUDA_ARCH_LIST  CUDA architectures to compile for (default: the visible GPU's, else a list)
  DEBUG=1               -O0 with debug symbols
  MAX_JOBS              parallel compile jobs (each needs 1.5-3 GB of RAM)
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _resolve_cuda() -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why."""
    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if os.environ.get("USE_CUDA", "").lower() in ("0", "false", "no", "off"):
        return False, "USE_CUDA=0"
    if _env_flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if not cuda_sources:
        return False, "no CUDA sources in csrc/cuda yet"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"CUDA toolkit at {cpp_extension.CUDA_HOME}"


def _resolve_cuda_archs() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}.{minor}"
    else:
        # torch's build code cannot detect an architecture without a GPU; give it a list.
        archs = DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _extension():
    debug = _env_flag("DEBUG")
    with_cuda, why = _resolve_cuda()
    archs = _resolve_cuda_archs() if with_cuda else ""
    print(f"lstm_ext build: CUDA {'on' if with_cuda else 'off'} ({why})"
          + (f", archs {archs}" if with_cuda else "") + f", {'debug' if debug else 'release'}")

    # Python's own CFLAGS carry -g: ~20 s more per build and a 50x larger library. -g0 undoes it.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx_flags = [*opt, "-fvisibility=hidden"]
    macros = [
        ("LSTM_EXT_WITH_CUDA", "1" if with_cuda else "0"),
        ("LSTM_EXT_CUDA_ARCHS", f'"{archs}"'),
    ]
    # Order matters a little: the baseline CPU file precedes the AVX2 one, so where the two share
    # an inline function from a torch header the linker keeps the baseline copy.
    sources = [
        "csrc/registration.cpp",
        "csrc/module.cpp",
        "csrc/common/lstm_sequence.cpp",
        "csrc/cpu/lstm_ops.cpp",
        "csrc/cpu/lstm_pointwise_default.cpp",
        "csrc/cpu/lstm_pointwise_avx2.cpp",
    ]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "lstm_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, define_macros=macros
        )
    sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    nvcc_flags = [*(["-O0", "-g", "-G"] if debug else ["-O3"]), "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "lstm_ext._C",
        sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        define_macros=macros,
    )


setup(
    name="lstm_ext",
    version="0.1.0",
    description="Fused LSTM kernels for PyTorch: drop-in torch.nn.LSTM / LSTMCell, faster",
    packages=["lstm_ext"],
    python_requires=">=3.9",
    install_requires=["torch"],
    extras_require={"plot": ["matplotlib"], "test": ["pytest", "numpy", "hypothesis"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
