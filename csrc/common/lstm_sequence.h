// The device-agnostic half of every lstm_ext operator: input checks, the time loop and its GEMMs.
//
// The GEMMs go through ATen (MKL/oneDNN on CPU, cuBLAS on the current stream on CUDA); only the
// fused pointwise pass of each step is device-specific. A device supplies it as a PointwiseKernels
// table, and its op registration file binds the functions below to that table.
//
// Shapes: T time, N batch, C input size, H hidden size.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "pointwise_step.h"

namespace lstm_ext {

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

// Gradients of lstm_forward: (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias).
// grad_bias [4H] is the gradient of b_ih and of b_hh alike (they enter the sum identically).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& saved_gates,
    const at::Tensor& saved_cells, bool reverse, const PointwiseKernels& kernels);

// One step, as torch.nn.LSTMCell: input [N, C], hx/cx [N, H].
// Returns (h [N, H], c [N, H], saved_gates [N, 4H], or empty when not training).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, bool training, const PointwiseKernels& kernels);

// Gradients of lstm_cell_forward: (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& input,
                   const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const at::Tensor& c, const at::Tensor& saved_gates,
                   const PointwiseKernels& kernels);

}  // namespace lstm_ext
