// The Python extension module lstm_ext._C. Loading it runs the static TORCH_LIBRARY registrations
// of the other translation units; the module itself only reports how the library was built.
// Operators never go through pybind11: they are reached through torch.ops.lstm_ext.
#include <pybind11/pybind11.h>

#ifndef LSTM_EXT_WITH_CUDA
#define LSTM_EXT_WITH_CUDA 0
#endif
#ifndef LSTM_EXT_CUDA_ARCHS
#define LSTM_EXT_CUDA_ARCHS ""
#endif

#include <cstdint>

namespace lstm_ext::cpu {
const char* cpu_capability();
int64_t empty_large_buffer_cache();
}

PYBIND11_MODULE(_C, module) {
  module.doc() = "lstm_ext compiled library: fused LSTM operators registered as torch.ops.lstm_ext.*";
  module.attr("with_cuda") = static_cast<bool>(LSTM_EXT_WITH_CUDA);
  module.attr("cuda_archs") = LSTM_EXT_CUDA_ARCHS;
  module.def("cpu_capability", &lstm_ext::cpu::cpu_capability,
             "Instruction set of the CPU kernels in use: AVX512, AVX2 or DEFAULT.");
  module.def("empty_cpu_cache", &lstm_ext::cpu::empty_large_buffer_cache,
             "Frees the idle blocks of the CPU buffer cache; returns the bytes released.");
}
