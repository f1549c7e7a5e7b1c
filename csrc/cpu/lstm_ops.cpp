// CPU kernels of the lstm_ext operators: the shared time loop (common/lstm_sequence.cpp) bound to the
// CPU pointwise passes, chosen once for the running CPU.
#include <torch/library.h>

#include "../common/lstm_sequence.h"

namespace lstm_ext::cpu {

// Defined in lstm_pointwise_default.cpp / lstm_pointwise_avx2.cpp.
PointwiseKernels default_pointwise_kernels();
bool avx2_pointwise_kernels(PointwiseKernels* kernels);

namespace {

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const PointwiseKernels& pointwise_kernels() {
  static const PointwiseKernels kernels = [] {
    PointwiseKernels chosen{};
    if (cpu_has_avx2_fma() && avx2_pointwise_kernels(&chosen)) {
      return chosen;
    }
    return default_pointwise_kernels();
  }();
  return kernels;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool reverse, bool training) {
  return lstm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training, pointwise_kernels());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& saved_gates,
    const at::Tensor& saved_cells, bool reverse) {
  return lstm_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, output,
                       saved_gates, saved_cells, reverse, pointwise_kernels());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training) {
  return lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, training, pointwise_kernels());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward_cpu(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                       const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const at::Tensor& c, const at::Tensor& saved_gates) {
  return lstm_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, c, saved_gates,
                            pointwise_kernels());
}

}  // namespace

// Which pointwise pass the running CPU uses, for lstm_ext.build_info().
const char* cpu_pointwise_capability() {
  PointwiseKernels avx2{};
  return cpu_has_avx2_fma() && avx2_pointwise_kernels(&avx2) ? "AVX2" : "DEFAULT";
}

}  // namespace lstm_ext::cpu

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("lstm_forward", &lstm_ext::cpu::lstm_forward_cpu);
  m.impl("_lstm_backward", &lstm_ext::cpu::lstm_backward_cpu);
  m.impl("lstm_cell_forward", &lstm_ext::cpu::lstm_cell_forward_cpu);
  m.impl("_lstm_cell_backward", &lstm_ext::cpu::lstm_cell_backward_cpu);
}
