// CPU kernels of the lstm_ext operators: the shared time loop (common/lstm_sequence.cpp) bound to
// the CPU kernels of the best instruction set the running CPU has, chosen once.
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "../common/lstm_sequence.h"
#include "kernel_sets.h"
#include "large_buffers.h"

namespace lstm_ext::cpu {
namespace {

bool cpu_supports(const char* isa) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (std::strcmp(isa, "AVX512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  }
  if (std::strcmp(isa, "AVX2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  return std::strcmp(isa, "DEFAULT") == 0;
}

// The best kernel set this build and this CPU share. LSTM_EXT_CPU_CAPABILITY (DEFAULT, AVX2 or
// AVX512) caps it, as ATEN_CPU_CAPABILITY does for ATen: for tests of every path and for
// comparisons.
CpuKernelSet choose_kernel_set() {
  const char* cap = std::getenv("LSTM_EXT_CPU_CAPABILITY");
  const std::string limit = cap ? cap : "AVX512";
  CpuKernelSet set;
  if (limit == "AVX512" && cpu_supports("AVX512") && avx512_kernel_set(&set)) {
    return set;
  }
  if ((limit == "AVX512" || limit == "AVX2") && cpu_supports("AVX2") && avx2_kernel_set(&set)) {
    return set;
  }
  return default_kernel_set();
}

const CpuKernelSet& kernel_set() {
  static const CpuKernelSet set = choose_kernel_set();
  return set;
}

// The backend for one op call, for float32 where this instruction set has the fused kernels:
// for sequences of more than one step, the one that packs W_hh once and keeps persistent
// threads; for a single step (streaming, decoding), where packing and starting the threads would
// cost more than the step's GEMMs (measured: 1.5-2x slower than ATen's GEMMs at T = 1), the one
// that runs a small batch's step on the weights as stored, ATen's GEMMs serving the rest.
std::unique_ptr<StepBackend> make_backend(const at::ScalarType dtype, int64_t steps) {
  const CpuKernelSet& set = kernel_set();
  const bool fused = dtype == at::kFloat && set.make_float_backend != nullptr;
  std::unique_ptr<StepBackend> backend =
      fused && steps > 1 ? set.make_float_backend(set.pointwise)
      : fused && set.make_single_step_float_backend != nullptr
          ? set.make_single_step_float_backend(set.pointwise)
          : std::make_unique<StepBackend>(set.pointwise);
  backend->set_buffer_allocator(&empty_large_buffer);
  return backend;
}

std::unique_ptr<StepBackend> make_backend(const at::Tensor& input,
                                          const std::optional<at::Tensor>& batch_sizes) {
  const int64_t steps = batch_sizes.has_value() ? batch_sizes->numel()
                                                : (input.dim() == 3 ? input.size(0) : 1);
  return make_backend(input.scalar_type(), steps);
}

ForwardResult lstm_forward_cpu(const at::Tensor& input, const at::Tensor& h0,
                                const at::Tensor& c0, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
                                const std::optional<at::Tensor>& w_hr,
                                const std::optional<at::Tensor>& batch_sizes) {
  const auto backend = make_backend(input, batch_sizes);
  return lstm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training, w_hr,
                      batch_sizes, *backend);
}

BackwardResult lstm_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                 const at::Tensor& grad_c_n, const at::Tensor& input,
                                 const at::Tensor& h0, const at::Tensor& c0,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                 const at::Tensor& output, const at::Tensor& saved_gates,
                                 const at::Tensor& saved_cells, bool reverse,
                                 const std::optional<at::Tensor>& w_hr,
                                 const std::optional<at::Tensor>& batch_sizes,
                                 const std::optional<at::Tensor>& saved_hidden) {
  const auto backend = make_backend(input, batch_sizes);
  return lstm_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, output,
                       saved_gates, saved_cells, reverse, w_hr, batch_sizes, saved_hidden,
                       *backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training) {
  const auto backend = make_backend(input.scalar_type(), /*steps=*/1);
  return lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, training, *backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward_cpu(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                       const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const at::Tensor& c, const at::Tensor& saved_gates) {
  StepBackend backend(kernel_set().pointwise);
  return lstm_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, c, saved_gates, backend);
}

ForwardResult lstm_variant_forward_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& peephole,
    bool coupled_gates, bool reverse, bool training, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, double zoneout) {
  const auto backend = make_backend(input, batch_sizes);
  return lstm_variant_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, coupled_gates,
                              reverse, training, w_hr, batch_sizes, zoneout_h, zoneout_c,
                              zoneout, *backend);
}

VariantBackwardResult lstm_variant_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& peephole, bool coupled_gates,
    const at::Tensor& output, const at::Tensor& saved_gates, const at::Tensor& saved_cells,
    bool reverse, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& saved_hidden, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, double zoneout) {
  const auto backend = make_backend(input, batch_sizes);
  return lstm_variant_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh,
                               peephole, coupled_gates, output, saved_gates, saved_cells, reverse,
                               w_hr, batch_sizes, saved_hidden, zoneout_h, zoneout_c, zoneout,
                               *backend);
}

LayerNormForwardResult lstm_layernorm_forward_cpu(
    const at::Tensor& input_part, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const at::Tensor& weight_hh, const at::Tensor& weight_c,
    const at::Tensor& bias_c, const std::optional<at::Tensor>& peephole, bool coupled_gates,
    bool reverse, bool training, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    double zoneout) {
  const auto backend = make_backend(input_part, batch_sizes);
  return lstm_layernorm_forward(input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole,
                                coupled_gates, reverse, training, batch_sizes, zoneout_h,
                                zoneout_c, zoneout, *backend);
}

LayerNormBackwardResult lstm_layernorm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const at::Tensor& weight_hh, const at::Tensor& weight_c, const at::Tensor& bias_c,
    const std::optional<at::Tensor>& peephole, bool coupled_gates, const at::Tensor& output,
    const at::Tensor& saved_gates, const at::Tensor& saved_cells,
    const std::optional<at::Tensor>& saved_hidden, const at::Tensor& saved_norm_hh,
    const at::Tensor& saved_norm_c, const at::Tensor& saved_rstd, bool reverse,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, double zoneout) {
  const auto backend = make_backend(grad_output, batch_sizes);
  return lstm_layernorm_backward(grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, weight_hh,
                                 weight_c, bias_c, peephole, coupled_gates, output, saved_gates,
                                 saved_cells, saved_hidden, saved_norm_hh, saved_norm_c,
                                 saved_rstd, reverse, batch_sizes, zoneout_h, zoneout_c, zoneout,
                                 *backend);
}

GruLayerResult gru_forward_cpu(const at::Tensor& input, const at::Tensor& h0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
                               const std::optional<at::Tensor>& batch_sizes) {
  const auto backend = make_backend(input, batch_sizes);
  return gru_forward(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, training, batch_sizes, *backend);
}

GruGradients gru_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                              const at::Tensor& input, const at::Tensor& h0,
                              const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const at::Tensor& output, const at::Tensor& saved_gates,
                              const at::Tensor& saved_hidden_n, bool reverse,
                              const std::optional<at::Tensor>& batch_sizes) {
  const auto backend = make_backend(input, batch_sizes);
  return gru_backward(grad_output, grad_h_n, input, h0, w_ih, w_hh, output, saved_gates,
                      saved_hidden_n, reverse, batch_sizes, *backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_forward_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool training) {
  const auto backend = make_backend(input.scalar_type(), /*steps=*/1);
  return gru_cell_forward(input, hx, w_ih, w_hh, b_ih, b_hh, training, *backend);
}

GruGradients gru_cell_backward_cpu(const at::Tensor& grad_h, const at::Tensor& input,
                                   const at::Tensor& hx, const at::Tensor& w_ih,
                                   const at::Tensor& w_hh, const at::Tensor& saved_gates,
                                   const at::Tensor& saved_hidden_n) {
  StepBackend backend(kernel_set().pointwise);
  return gru_cell_backward(grad_h, input, hx, w_ih, w_hh, saved_gates, saved_hidden_n, backend);
}

}  // namespace

// The instruction set of the CPU kernels in use, for lstm_ext.build_info().
const char* cpu_capability() { return kernel_set().name; }

}  // namespace lstm_ext::cpu

TORCH_LIBRARY_IMPL(lstm_ext, CPU, m) {
  m.impl("lstm_forward", &lstm_ext::cpu::lstm_forward_cpu);
  m.impl("_lstm_backward", &lstm_ext::cpu::lstm_backward_cpu);
  m.impl("lstm_cell_forward", &lstm_ext::cpu::lstm_cell_forward_cpu);
  m.impl("_lstm_cell_backward", &lstm_ext::cpu::lstm_cell_backward_cpu);
  m.impl("lstm_variant_forward", &lstm_ext::cpu::lstm_variant_forward_cpu);
  m.impl("_lstm_variant_backward", &lstm_ext::cpu::lstm_variant_backward_cpu);
  m.impl("lstm_layernorm_forward", &lstm_ext::cpu::lstm_layernorm_forward_cpu);
  m.impl("_lstm_layernorm_backward", &lstm_ext::cpu::lstm_layernorm_backward_cpu);
  m.impl("gru_forward", &lstm_ext::cpu::gru_forward_cpu);
  m.impl("_gru_backward", &lstm_ext::cpu::gru_backward_cpu);
  m.impl("gru_cell_forward", &lstm_ext::cpu::gru_cell_forward_cpu);
  m.impl("_gru_cell_backward", &lstm_ext::cpu::gru_cell_backward_cpu);
}
