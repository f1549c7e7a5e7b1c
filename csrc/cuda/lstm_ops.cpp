// CUDA kernels of the lstm_ext operators: the shared time loop (common/lstm_sequence.cpp) bound to
// the CUDA pointwise passes (lstm_pointwise.cu). The loop's GEMMs go through ATen, hence cuBLAS on
// the current stream; the pointwise kernels launch on that same stream, so the steps stay ordered
// without any synchronization.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/lstm_sequence.h"

namespace lstm_ext::cuda {

// Defined in lstm_pointwise.cu.
PointwiseKernels cuda_pointwise_kernels();

namespace {

// The dispatcher picks these kernels when any argument is on CUDA, so `input` may be on the CPU;
// the time loop's device checks then reject the call with a message naming the tensors, which a
// guard asked to switch to a CPU device would preempt with an internal assert.
std::optional<c10::Device> cuda_device_of(const at::Tensor& input) {
  return input.is_cuda() ? std::make_optional(input.device()) : std::nullopt;
}

const PointwiseKernels& pointwise_kernels() {
  static const PointwiseKernels kernels = cuda_pointwise_kernels();
  return kernels;
}

ForwardResult lstm_forward_cuda(const at::Tensor& input, const at::Tensor& h0,
                                const at::Tensor& c0, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
                                const std::optional<at::Tensor>& w_hr,
                                const std::optional<at::Tensor>& batch_sizes) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return lstm_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, training, w_hr,
                      batch_sizes, backend);
}

// batch_sizes stays on the CPU (as in a PackedSequence): the loop reads it on the host.
BackwardResult lstm_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                  const at::Tensor& grad_c_n, const at::Tensor& input,
                                  const at::Tensor& h0, const at::Tensor& c0,
                                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const at::Tensor& output, const at::Tensor& saved_gates,
                                  const at::Tensor& saved_cells, bool reverse,
                                  const std::optional<at::Tensor>& w_hr,
                                  const std::optional<at::Tensor>& batch_sizes,
                                  const std::optional<at::Tensor>& saved_hidden) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return lstm_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, output,
                       saved_gates, saved_cells, reverse, w_hr, batch_sizes, saved_hidden,
                       backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return lstm_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, training, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward_cuda(const at::Tensor& grad_h, const at::Tensor& grad_c,
                        const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                        const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& c,
                        const at::Tensor& saved_gates) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return lstm_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, c, saved_gates,
                            backend);
}

ForwardResult lstm_variant_forward_cuda(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& peephole,
    bool coupled_gates, bool reverse, bool training, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, double zoneout) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return lstm_variant_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, coupled_gates,
                              reverse, training, w_hr, batch_sizes, zoneout_h, zoneout_c,
                              zoneout, backend);
}

VariantBackwardResult lstm_variant_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& peephole, bool coupled_gates,
    const at::Tensor& output, const at::Tensor& saved_gates, const at::Tensor& saved_cells,
    bool reverse, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& saved_hidden, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, double zoneout) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return lstm_variant_backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh,
                               peephole, coupled_gates, output, saved_gates, saved_cells, reverse,
                               w_hr, batch_sizes, saved_hidden, zoneout_h, zoneout_c, zoneout,
                               backend);
}

LayerNormForwardResult lstm_layernorm_forward_cuda(
    const at::Tensor& input_part, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_hh, const at::Tensor& weight_hh, const at::Tensor& weight_c,
    const at::Tensor& bias_c, const std::optional<at::Tensor>& peephole, bool coupled_gates,
    bool reverse, bool training, const std::optional<at::Tensor>& batch_sizes,
    const std::optional<at::Tensor>& zoneout_h, const std::optional<at::Tensor>& zoneout_c,
    double zoneout) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input_part));
  StepBackend backend(pointwise_kernels());
  return lstm_layernorm_forward(input_part, h0, c0, w_hh, weight_hh, weight_c, bias_c, peephole,
                                coupled_gates, reverse, training, batch_sizes, zoneout_h,
                                zoneout_c, zoneout, backend);
}

LayerNormBackwardResult lstm_layernorm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
    const at::Tensor& weight_hh, const at::Tensor& weight_c, const at::Tensor& bias_c,
    const std::optional<at::Tensor>& peephole, bool coupled_gates, const at::Tensor& output,
    const at::Tensor& saved_gates, const at::Tensor& saved_cells,
    const std::optional<at::Tensor>& saved_hidden, const at::Tensor& saved_norm_hh,
    const at::Tensor& saved_norm_c, const at::Tensor& saved_rstd, bool reverse,
    const std::optional<at::Tensor>& batch_sizes, const std::optional<at::Tensor>& zoneout_h,
    const std::optional<at::Tensor>& zoneout_c, double zoneout) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(grad_output));
  StepBackend backend(pointwise_kernels());
  return lstm_layernorm_backward(grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, weight_hh,
                                 weight_c, bias_c, peephole, coupled_gates, output, saved_gates,
                                 saved_cells, saved_hidden, saved_norm_hh, saved_norm_c,
                                 saved_rstd, reverse, batch_sizes, zoneout_h, zoneout_c, zoneout,
                                 backend);
}

GruLayerResult gru_forward_cuda(const at::Tensor& input, const at::Tensor& h0,
                                const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const std::optional<at::Tensor>& b_ih,
                                const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
                                const std::optional<at::Tensor>& batch_sizes) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return gru_forward(input, h0, w_ih, w_hh, b_ih, b_hh, reverse, training, batch_sizes, backend);
}

GruGradients gru_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                               const at::Tensor& input, const at::Tensor& h0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const at::Tensor& output, const at::Tensor& saved_gates,
                               const at::Tensor& saved_hidden_n, bool reverse,
                               const std::optional<at::Tensor>& batch_sizes) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return gru_backward(grad_output, grad_h_n, input, h0, w_ih, w_hh, output, saved_gates,
                      saved_hidden_n, reverse, batch_sizes, backend);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_cell_forward_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool training) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return gru_cell_forward(input, hx, w_ih, w_hh, b_ih, b_hh, training, backend);
}

GruGradients gru_cell_backward_cuda(const at::Tensor& grad_h, const at::Tensor& input,
                                    const at::Tensor& hx, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const at::Tensor& saved_gates,
                                    const at::Tensor& saved_hidden_n) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(input));
  StepBackend backend(pointwise_kernels());
  return gru_cell_backward(grad_h, input, hx, w_ih, w_hh, saved_gates, saved_hidden_n, backend);
}

}  // namespace
}  // namespace lstm_ext::cuda

TORCH_LIBRARY_IMPL(lstm_ext, CUDA, m) {
  m.impl("lstm_forward", &lstm_ext::cuda::lstm_forward_cuda);
  m.impl("_lstm_backward", &lstm_ext::cuda::lstm_backward_cuda);
  m.impl("lstm_cell_forward", &lstm_ext::cuda::lstm_cell_forward_cuda);
  m.impl("_lstm_cell_backward", &lstm_ext::cuda::lstm_cell_backward_cuda);
  m.impl("lstm_variant_forward", &lstm_ext::cuda::lstm_variant_forward_cuda);
  m.impl("_lstm_variant_backward", &lstm_ext::cuda::lstm_variant_backward_cuda);
  m.impl("lstm_layernorm_forward", &lstm_ext::cuda::lstm_layernorm_forward_cuda);
  m.impl("_lstm_layernorm_backward", &lstm_ext::cuda::lstm_layernorm_backward_cuda);
  m.impl("gru_forward", &lstm_ext::cuda::gru_forward_cuda);
  m.impl("_gru_backward", &lstm_ext::cuda::gru_backward_cuda);
  m.impl("gru_cell_forward", &lstm_ext::cuda::gru_cell_forward_cuda);
  m.impl("_gru_cell_backward", &lstm_ext::cuda::gru_cell_backward_cuda);
}
