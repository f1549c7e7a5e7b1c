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
import importlib.util
import os
import shutil


def _default_cuda_home() -> None:
    """Sets CUDA_HOME to the real toolkit when the nvcc on PATH is a wrapper outside it.

    torch guesses CUDA_HOME as nvcc's grandparent folder: /usr/local for a /usr/local/bin/nvcc
    wrapper script, whose include/ has no CUDA headers, so every .cpp file that includes a c10/cuda
    header fails to compile (nvcc itself still finds its own headers, which hides the problem). It
    must run before torch.utils.cpp_extension is imported: that module reads CUDA_HOME once.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(nvcc))
    if os.path.isfile(os.path.join(guess, "include", "cuda_runtime_api.h")):
        return
    for candidate in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.isfile(os.path.join(candidate, "bin", "nvcc")) and os.path.isfile(
            os.path.join(candidate, "include", "cuda_runtime_api.h")
        ):
            os.environ["CUDA_HOME"] = candidate
            return


_default_cuda_home()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

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


def _cuda_wheel_include_dirs() -> list[str]:
    """Header folders of the nvidia-* wheels that a pip-installed CUDA torch depends on.

    A pip-installed torch gets cuBLAS, cuSPARSE and cuSOLVER from those wheels, and a local
    toolkit that ships only nvcc and the runtime lacks their headers, which
    ATen/cuda/CUDAContext.h includes. Our kernels avoid that header; with these folders a file
    that includes it still compiles. They go in as -isystem, searched after the toolkit's own -I
    folder, so the toolkit's runtime headers win over the wheels' copies of them.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    major = (torch.version.cuda or "").split(".")[0]
    found = []
    for root in spec.submodule_search_locations:
        # CUDA 13 wheels share one folder per major version; CUDA 12 wheels had one per library.
        for sub in (f"cu{major}", "cublas", "cusparse", "cusolver"):
            include = os.path.join(root, sub, "include")
            if os.path.isdir(include) and include not in found:
                found.append(include)
    return found


def _extension():
    debug = _env_flag("DEBUG")
    with_cuda, why = _resolve_cuda()
    archs = _resolve_cuda_archs() if with_cuda else ""
    print(f"lstm_ext build: CUDA {'on' if with_cuda else 'off'} ({why})"
          + (f", archs {archs}" if with_cuda else "") + f", {'debug' if debug else 'release'}")

    # Python's own CFLAGS carry -g: ~20 s more per build and a 50x larger library. -g0 undoes it.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fopenmp: at::parallel_for is inline in torch's headers and runs on one thread unless the
    # extension itself is compiled with OpenMP. libgomp.so.1 then resolves to the copy torch loaded.
    cxx_flags = [*opt, "-fvisibility=hidden", "-fopenmp"]
    macros = [
        ("LSTM_EXT_WITH_CUDA", "1" if with_cuda else "0"),
        ("LSTM_EXT_CUDA_ARCHS", f'"{archs}"'),
    ]
    # Order matters a little: the baseline CPU file precedes the AVX2/AVX-512 ones, so where they
    # share an inline function from a torch header the linker keeps the baseline copy.
    sources = [
        "csrc/registration.cpp",
        "csrc/module.cpp",
        "csrc/common/lstm_sequence.cpp",
        "csrc/cpu/lstm_ops.cpp",
        "csrc/cpu/large_buffers.cpp",
        "csrc/cpu/lstm_kernels_default.cpp",
        "csrc/cpu/lstm_kernels_avx2.cpp",
        "csrc/cpu/lstm_kernels_avx512.cpp",
    ]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "lstm_ext._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            define_macros=macros,
        )
    for pattern in ("*.cu", "*.cpp"):
        found = glob.glob(os.path.join(ROOT, "csrc", "cuda", pattern))
        sources += sorted(os.path.relpath(p, ROOT) for p in found)
    nvcc_flags = [*(["-O0", "-g", "-G"] if debug else ["-O3"]), "--expt-relaxed-constexpr"]
    for include in _cuda_wheel_include_dirs():
        cxx_flags += ["-isystem", include]
        nvcc_flags += ["-isystem", include]
    return cpp_extension.CUDAExtension(
        "lstm_ext._C",
        sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
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
