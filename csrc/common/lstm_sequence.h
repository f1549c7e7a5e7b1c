// The device-agnostic half of every lstm_ext operator: input checks, the time loop and its GEMMs.
//
// The time loop is written once. How it multiplies is a StepBackend: the default one issues ATen
// GEMMs (MKL on CPU, cuBLAS on the current stream on CUDA) and calls the device's fused pointwise
// passes, which a device supplies as a PointwiseKernels table. A device may subclass StepBackend
// to do better (the CPU float32 path fuses each step's GEMM with its pointwise pass over weights
// packed once per call).
//
// Shapes: T time, N batch, C input size, H hidden size.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "pointwise_step.h"

namespace lstm_ext {

class StepBackend {
 public:
  explicit StepBackend(const PointwiseKernels& kernels) : kernels_(kernels) {}
  virtual ~StepBackend() = default;

  // out = a b, or out += a b when `accumulate`. a [M, K] and b [K, Ncols] may be strided views
  // (e.g. transposes); out is contiguous [M, Ncols].
  virtual void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate);

  // Called once before a forward time loop with that loop's w_hh [4H, H].
  virtual void begin_forward(const at::Tensor& w_hh) { w_hh_ = w_hh; }
  // One forward step: gates [N, 4H] += h_prev [N, H] W_hh^T, then the fused pointwise pass
  // (c [N, H] and h [N, H] out; activated gates in place of `gates` when training).
  virtual void forward_step(const at::Tensor& h_prev, at::Tensor& gates, const at::Tensor& c_prev,
                            at::Tensor& c, at::Tensor& h, bool training);

  // Called once before a backward time loop with that loop's w_hh [4H, H].
  virtual void begin_backward(const at::Tensor& w_hh) { w_hh_ = w_hh; }
  // The backward pointwise pass of one step.
  void backward_pointwise(const BackwardStepArgs& args, c10::ScalarType dtype) const {
    kernels_.backward_step(args, dtype);
  }
  // d_h [N, H] = d_gates [N, 4H] W_hh: the gradient that reaches h_{t-1} through step t.
  virtual void recurrent_gradient(const at::Tensor& d_gates, at::Tensor& d_h);

 protected:
  PointwiseKernels kernels_;
  at::Tensor w_hh_;
};

// Whole-sequence forward of one layer in one direction. `reverse` runs the recurrence from t = T-1
// down to 0 (the backward direction of a bidirectional layer) without flipping any tensor.
// Returns (output [T, N, H], h_n [N, H], c_n [N, H], saved_gates, saved_cells); when training the
// last two are the activated gates [T, N, 4H] and the cell states [T, N, H] that backward needs,
// otherwise empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool reverse, bool training,
    const PointwiseKernels& kernels);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool reverse, bool training, StepBackend& backend);

// Gradients of lstm_forward: (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias).
// grad_bias [4H] is the gradient of b_ih and of b_hh alike (they enter the sum identically).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& saved_gates,
    const at::Tensor& saved_cells, bool reverse, const PointwiseKernels& kernels);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& saved_gates,
    const at::Tensor& saved_cells, bool reverse, StepBackend& backend);

// One step, as torch.nn.LSTMCell: input [N, C], hx/cx [N, H].
// Returns (h [N, H], c [N, H], saved_gates [N, 4H], or empty when not training).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training, const PointwiseKernels& kernels);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training, StepBackend& backend);

// Gradients of lstm_cell_forward: (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                   const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& c, const at::Tensor& saved_gates,
                   const PointwiseKernels& kernels);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                   const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& c, const at::Tensor& saved_gates,
                   StepBackend& backend);

}  // namespace lstm_ext
