// The CUDA pointwise passes of the LSTM time loop: one grid-stride kernel per step, forward and
// backward, over the N x H units of the step. Each unit's arithmetic is cell_math.h's, the same
// functions the CPU pass runs, so only the index mapping and the launch here are GPU-only code.
//
// Compile time is dominated by headers, so this file includes no ATen tensor headers: it sees the
// step through pointwise_step.h's raw pointers, and cuda/lstm_ops.cpp binds it to the time loop.
//
// Shapes: N batch, H hidden size; gates rows are [i | f | g | o], each of length H.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "../common/cell_math.h"
#include "../common/pointwise_step.h"

namespace lstm_ext::cuda {
namespace {

constexpr int kThreadsPerBlock = 256;
// A grid-stride loop covers any N x H; past this many blocks (enough to fill every SM of current
// GPUs several times over) extra blocks would only add scheduling overhead.
constexpr int64_t kMaxBlocks = 4096;

unsigned int blocks_for(int64_t units) {
  return static_cast<unsigned int>(
      std::min<int64_t>((units + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks));
}

// Walks the units u = n * H + j owned by this thread in a grid-stride loop. The (n, j) pair is
// advanced by the constant stride instead of being recomputed from u: a 64-bit division per unit
// costs more than the unit's loads.
class UnitCursor {
 public:
  __device__ explicit UnitCursor(int64_t hidden) : hidden_(hidden) {
    unit_ = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    stride_ = static_cast<int64_t>(gridDim.x) * blockDim.x;
    n_ = unit_ / hidden;
    j_ = unit_ - n_ * hidden;
    stride_n_ = stride_ / hidden;
    stride_j_ = stride_ - stride_n_ * hidden;
  }
  __device__ bool in(int64_t units) const { return unit_ < units; }
  __device__ void next() {
    unit_ += stride_;
    n_ += stride_n_;
    j_ += stride_j_;
    if (j_ >= hidden_) {
      j_ -= hidden_;
      ++n_;
    }
  }
  __device__ int64_t unit() const { return unit_; }  // offset in an [N, H] buffer
  __device__ int64_t gate_offset() const { return n_ * 4 * hidden_ + j_; }  // of gate i in [N, 4H]

 private:
  int64_t hidden_, unit_, stride_, n_, j_, stride_n_, stride_j_;
};

// `c` may alias `c_prev` (inference updates the running cell state in place); each unit reads its
// c_prev before writing its c, and no two units share an element, so neither is __restrict__.
template <typename scalar_t, bool kTraining>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_step_kernel(scalar_t* gates, const scalar_t* c_prev, scalar_t* c,
                        scalar_t* __restrict__ h, int64_t batch, int64_t hidden) {
  using V = at::opmath_type<scalar_t>;
  const int64_t units = batch * hidden;
  for (UnitCursor u(hidden); u.in(units); u.next()) {
    scalar_t* g = gates + u.gate_offset();
    const GatePreActivations<V> pre{static_cast<V>(g[0]), static_cast<V>(g[hidden]),
                                    static_cast<V>(g[2 * hidden]), static_cast<V>(g[3 * hidden])};
    const CellForwardResult<V> r = lstm_cell_forward_unit(pre, static_cast<V>(c_prev[u.unit()]));
    c[u.unit()] = static_cast<scalar_t>(r.c);
    h[u.unit()] = static_cast<scalar_t>(r.h);
    if constexpr (kTraining) {
      g[0] = static_cast<scalar_t>(r.gates.i);
      g[hidden] = static_cast<scalar_t>(r.gates.f);
      g[2 * hidden] = static_cast<scalar_t>(r.gates.g);
      g[3 * hidden] = static_cast<scalar_t>(r.gates.o);
    }
  }
}

// d_c is read and overwritten in place (gradient of c_t in, of c_{t-1} out) by the unit that owns
// the element; no other pointer reaches it, so __restrict__ still holds.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_step_kernel(const scalar_t* __restrict__ gates, const scalar_t* __restrict__ c,
                         const scalar_t* __restrict__ c_prev,
                         const scalar_t* __restrict__ d_h_output,
                         const scalar_t* __restrict__ d_h_recurrent, scalar_t* __restrict__ d_c,
                         scalar_t* __restrict__ d_gates, int64_t batch, int64_t hidden) {
  using V = at::opmath_type<scalar_t>;
  const int64_t units = batch * hidden;
  for (UnitCursor u(hidden); u.in(units); u.next()) {
    const int64_t k = u.unit();
    const scalar_t* a = gates + u.gate_offset();
    const GateActivations<V> act{static_cast<V>(a[0]), static_cast<V>(a[hidden]),
                                 static_cast<V>(a[2 * hidden]), static_cast<V>(a[3 * hidden])};
    // Both gradients reaching h_t are summed in opmath precision, as the CPU pass does.
    const V d_h = static_cast<V>(d_h_output[k]) + static_cast<V>(d_h_recurrent[k]);
    const CellBackwardResult<V> r = lstm_cell_backward_unit(
        act, static_cast<V>(c[k]), static_cast<V>(c_prev[k]), d_h, static_cast<V>(d_c[k]));
    scalar_t* dg = d_gates + u.gate_offset();
    dg[0] = static_cast<scalar_t>(r.d_i);
    dg[hidden] = static_cast<scalar_t>(r.d_f);
    dg[2 * hidden] = static_cast<scalar_t>(r.d_g);
    dg[3 * hidden] = static_cast<scalar_t>(r.d_o);
    d_c[k] = static_cast<scalar_t>(r.d_c_prev);
  }
}

// The caller (cuda/lstm_ops.cpp) has made the tensors' device current, so the current stream is
// the one of that device; the time loop's cuBLAS GEMMs run on it too.
template <typename scalar_t>
void launch_forward_step(const ForwardStepArgs& a) {
  const int64_t units = a.batch * a.hidden;
  if (units == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* gates = static_cast<scalar_t*>(a.gates);
  const auto* c_prev = static_cast<const scalar_t*>(a.c_prev);
  auto* c = static_cast<scalar_t*>(a.c);
  auto* h = static_cast<scalar_t*>(a.h);
  if (a.training) {
    forward_step_kernel<scalar_t, true><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
        gates, c_prev, c, h, a.batch, a.hidden);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    forward_step_kernel<scalar_t, false><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
        gates, c_prev, c, h, a.batch, a.hidden);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void launch_backward_step(const BackwardStepArgs& a) {
  const int64_t units = a.batch * a.hidden;
  if (units == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  backward_step_kernel<scalar_t><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
      static_cast<const scalar_t*>(a.gates), static_cast<const scalar_t*>(a.c),
      static_cast<const scalar_t*>(a.c_prev), static_cast<const scalar_t*>(a.d_h_output),
      static_cast<const scalar_t*>(a.d_h_recurrent), static_cast<scalar_t*>(a.d_c),
      static_cast<scalar_t*>(a.d_gates), a.batch, a.hidden);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void forward_step(const ForwardStepArgs& args, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(c10::kHalf, c10::kBFloat16, dtype, "lstm_ext_cuda_forward_step",
                                  [&] { launch_forward_step<scalar_t>(args); });
}

void backward_step(const BackwardStepArgs& args, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(c10::kHalf, c10::kBFloat16, dtype, "lstm_ext_cuda_backward_step",
                                  [&] { launch_backward_step<scalar_t>(args); });
}

}  // namespace

PointwiseKernels cuda_pointwise_kernels() { return {&forward_step, &backward_step}; }

}  // namespace lstm_ext::cuda
