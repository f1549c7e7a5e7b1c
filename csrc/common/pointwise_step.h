// The contract between the device-agnostic time loop (lstm_sequence.cpp) and a device's fused
// pointwise passes: raw pointers and sizes, no tensors. It lives apart from lstm_sequence.h, which
// pulls in ATen's Tensor, so that device kernel files can include it and stay cheap to compile
// (a .cu file's compile time is dominated by the torch headers it includes).
//
// Shapes: N batch, H hidden size.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace lstm_ext {

// One step of the forward pointwise pass, over N x H units. Raw pointers keep the device kernel
// files free of heavy headers; every buffer is contiguous, rows of length 4H (gates) or H.
struct ForwardStepArgs {
  void* gates;         // [N, 4H] in: pre-activations (biases included); out, when training: activations
  const void* c_prev;  // [N, H]  c_{t-1}
  void* c;             // [N, H]  out: c_t (may alias c_prev)
  void* h;             // [N, H]  out: h_t
  int64_t batch;       // N
  int64_t hidden;      // H
  bool training;       // save the activated gates in place of the pre-activations
};

// One step of the backward pointwise pass.
struct BackwardStepArgs {
  const void* gates;        // [N, 4H] saved activations of step t
  const void* c;            // [N, H]  saved c_t
  const void* c_prev;       // [N, H]  c_{t-1}
  const void* d_h_output;   // [N, H]  gradient of output[t]
  const void* d_h_recurrent;  // [N, H] gradient reaching h_t through step t+1 (or from h_n)
  void* d_c;                // [N, H]  in: gradient reaching c_t; out: gradient of c_{t-1} (in place)
  void* d_gates;            // [N, 4H] out: gradient of the gate pre-activations
  int64_t batch;
  int64_t hidden;
};

// A device's pointwise passes. `dtype` is the tensors' scalar type; the kernels dispatch on it.
struct PointwiseKernels {
  void (*forward_step)(const ForwardStepArgs& args, c10::ScalarType dtype);
  void (*backward_step)(const BackwardStepArgs& args, c10::ScalarType dtype);
};

}  // namespace lstm_ext
