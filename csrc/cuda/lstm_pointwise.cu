// The CUDA pointwise passes of the LSTM and GRU time loops: one grid-stride kernel per step, forward and
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
  __device__ int64_t column() const { return j_; }    // j, the hidden unit
  // Offset of the unit's first gate in a [N, gates * H] buffer (4 gates: LSTM, 3: GRU).
  __device__ int64_t gate_offset(int64_t gates = 4) const { return n_ * gates * hidden_ + j_; }

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

// The LSTM variants' passes (peepholes [3, H] or null; coupled gates: rows [i | g | o]).
template <typename V, typename scalar_t>
__device__ inline LstmVariantUnit<V> variant_unit(const scalar_t* peephole, bool coupled,
                                                  int64_t hidden, int64_t j) {
  if (peephole == nullptr) {
    return {false, coupled, V(0), V(0), V(0)};
  }
  return {true, coupled, static_cast<V>(peephole[j]), static_cast<V>(peephole[hidden + j]),
          static_cast<V>(peephole[2 * hidden + j])};
}

// The variant kernels take the step's arguments by value (raw pointers and sizes, trivially
// copyable): there are too many for a readable parameter list.
template <typename scalar_t, bool kTraining>
__global__ void __launch_bounds__(kThreadsPerBlock)
    variant_forward_step_kernel(const ForwardStepArgs a) {
  using V = at::opmath_type<scalar_t>;
  const int64_t hidden = a.hidden, units = a.batch * hidden;
  const bool coupled = a.coupled;
  const int64_t f_at = hidden, g_at = (coupled ? 1 : 2) * hidden, o_at = (coupled ? 2 : 3) * hidden;
  const auto* peephole = static_cast<const scalar_t*>(a.peephole);
  const auto* keep_h_mask = static_cast<const scalar_t*>(a.zoneout_h);
  const auto* keep_c_mask = static_cast<const scalar_t*>(a.zoneout_c);
  for (UnitCursor u(hidden); u.in(units); u.next()) {
    const int64_t k = u.unit();
    scalar_t* g = static_cast<scalar_t*>(a.gates) + u.gate_offset(coupled ? 3 : 4);
    const V pre_i = static_cast<V>(g[0]);
    const GatePreActivations<V> pre{pre_i, coupled ? pre_i : static_cast<V>(g[f_at]),
                                    static_cast<V>(g[g_at]), static_cast<V>(g[o_at])};
    // c may alias c_prev (inference's running state): read before writing.
    const V c_prev = static_cast<V>(static_cast<const scalar_t*>(a.c_prev)[k]);
    const CellForwardResult<V> r = lstm_variant_forward_unit(
        pre, c_prev, variant_unit<V>(peephole, coupled, hidden, u.column()));
    V c = r.c, h = r.h;
    if (a.zoneout) {
      const V keep_c = keep_c_mask ? static_cast<V>(keep_c_mask[k]) : V(a.zoneout_p);
      const V keep_h = keep_h_mask ? static_cast<V>(keep_h_mask[k]) : V(a.zoneout_p);
      c = r.c + keep_c * (c_prev - r.c);
      h = r.h + keep_h * (static_cast<V>(static_cast<const scalar_t*>(a.h_prev)[k]) - r.h);
      if constexpr (kTraining) {
        static_cast<scalar_t*>(a.c_new)[k] = static_cast<scalar_t>(r.c);
      }
    }
    static_cast<scalar_t*>(a.c)[k] = static_cast<scalar_t>(c);
    static_cast<scalar_t*>(a.h)[k] = static_cast<scalar_t>(h);
    if constexpr (kTraining) {
      g[0] = static_cast<scalar_t>(r.gates.i);
      if (!coupled) {
        g[f_at] = static_cast<scalar_t>(r.gates.f);
      }
      g[g_at] = static_cast<scalar_t>(r.gates.g);
      g[o_at] = static_cast<scalar_t>(r.gates.o);
    }
  }
}

// d_c and (with zoneout) d_h_prev, which may alias d_h_recurrent, are read and written in place
// by the unit that owns the element.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    variant_backward_step_kernel(const BackwardStepArgs a) {
  using V = at::opmath_type<scalar_t>;
  const int64_t hidden = a.hidden, units = a.batch * hidden;
  const bool coupled = a.coupled;
  const int64_t f_at = hidden, g_at = (coupled ? 1 : 2) * hidden, o_at = (coupled ? 2 : 3) * hidden;
  const auto* peephole = static_cast<const scalar_t*>(a.peephole);
  const auto* keep_h_mask = static_cast<const scalar_t*>(a.zoneout_h);
  const auto* keep_c_mask = static_cast<const scalar_t*>(a.zoneout_c);
  auto* d_c = static_cast<scalar_t*>(a.d_c);
  for (UnitCursor u(hidden); u.in(units); u.next()) {
    const int64_t k = u.unit();
    const int64_t offset = u.gate_offset(coupled ? 3 : 4);
    const scalar_t* act_row = static_cast<const scalar_t*>(a.gates) + offset;
    const V i = static_cast<V>(act_row[0]);
    const GateActivations<V> act{i, coupled ? V(1) - i : static_cast<V>(act_row[f_at]),
                                 static_cast<V>(act_row[g_at]), static_cast<V>(act_row[o_at])};
    V d_h = static_cast<V>(static_cast<const scalar_t*>(a.d_h_output)[k]) +
            static_cast<V>(static_cast<const scalar_t*>(a.d_h_recurrent)[k]);
    V d_c_t = static_cast<V>(d_c[k]);
    V d_c_kept(0);
    if (a.zoneout) {
      const V keep_c = keep_c_mask ? static_cast<V>(keep_c_mask[k]) : V(a.zoneout_p);
      const V keep_h = keep_h_mask ? static_cast<V>(keep_h_mask[k]) : V(a.zoneout_p);
      static_cast<scalar_t*>(a.d_h_prev)[k] = static_cast<scalar_t>(keep_h * d_h);
      d_h = d_h - keep_h * d_h;
      d_c_kept = keep_c * d_c_t;
      d_c_t = d_c_t - d_c_kept;
    }
    const CellBackwardResult<V> r = lstm_variant_backward_unit(
        act, static_cast<V>(static_cast<const scalar_t*>(a.c)[k]),
        static_cast<V>(static_cast<const scalar_t*>(a.c_prev)[k]), d_h, d_c_t,
        variant_unit<V>(peephole, coupled, hidden, u.column()));
    scalar_t* dg = static_cast<scalar_t*>(a.d_gates) + offset;
    dg[0] = static_cast<scalar_t>(r.d_i);
    if (!coupled) {
      dg[f_at] = static_cast<scalar_t>(r.d_f);
    }
    dg[g_at] = static_cast<scalar_t>(r.d_g);
    dg[o_at] = static_cast<scalar_t>(r.d_o);
    d_c[k] = static_cast<scalar_t>(r.d_c_prev + d_c_kept);
  }
}

// The layer-norm LSTM's passes (cell_math.h): one block per row of the batch, its threads striding
// over the row's units; the row's normalizations need block-wide sums between the passes (sums in
// a fixed order, so results do not vary from run to run).
constexpr int kLayerNormThreads = 256;

// The sum of `value` over the block's threads, returned to every thread. `scratch` is shared
// memory of one value per warp; the trailing barrier lets the next call reuse it.
template <typename V>
__device__ inline V block_sum(V value, V* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  if (lane == 0) {
    scratch[warp] = value;
  }
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : V(0);
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    if (lane == 0) {
      scratch[0] = value;
    }
  }
  __syncthreads();
  const V total = scratch[0];
  __syncthreads();
  return total;
}

// Mean and reciprocal standard deviation of x[0, width), to every thread (two passes, as the
// CPU's).
template <typename V, typename scalar_t>
__device__ inline void row_moments(const scalar_t* x, int64_t width, V* scratch, V& mean,
                                   V& rstd) {
  V sum(0);
  for (int64_t e = threadIdx.x; e < width; e += blockDim.x) {
    sum += static_cast<V>(x[e]);
  }
  mean = block_sum(sum, scratch) / static_cast<V>(width);
  V squares(0);
  for (int64_t e = threadIdx.x; e < width; e += blockDim.x) {
    const V deviation = static_cast<V>(x[e]) - mean;
    squares += deviation * deviation;
  }
  const V variance = block_sum(squares, scratch) / static_cast<V>(width);
  rstd = V(1) / sqrt(variance + static_cast<V>(kLayerNormEps));
}

// The writes of one pass that a later pass reads (c_t parked in h's row, the activated gates,
// d_c_out, d_gates) are made and read by the same thread for the same unit, or after a
// block_sum's barriers, so the block sees them.
template <typename scalar_t, bool kTraining>
__global__ void __launch_bounds__(kLayerNormThreads)
    layer_norm_forward_step_kernel(const ForwardStepArgs a) {
  using V = at::opmath_type<scalar_t>;
  __shared__ V scratch[32];
  const int64_t n = blockIdx.x, hidden = a.hidden;
  const bool coupled = a.coupled;
  const int64_t width = (coupled ? 3 : 4) * hidden;
  const int64_t f_at = hidden, g_at = (coupled ? 1 : 2) * hidden, o_at = (coupled ? 2 : 3) * hidden;
  const auto& ln = a.ln;
  const auto* recurrent = static_cast<const scalar_t*>(ln.recurrent) + n * width;
  auto* gates = static_cast<scalar_t*>(a.gates) + n * width;
  const auto* weight_hh = static_cast<const scalar_t*>(ln.weight_hh);
  const auto* peephole = static_cast<const scalar_t*>(a.peephole);
  const int64_t row = n * hidden;
  const auto* c_prev = static_cast<const scalar_t*>(a.c_prev) + row;
  // h_t's row holds c_t before zoneout between the passes (c may alias c_prev).
  auto* h = static_cast<scalar_t*>(a.h) + row;
  auto* norm_hh = kTraining ? static_cast<scalar_t*>(ln.norm_hh) + n * width : nullptr;

  V mean_hh, rstd_hh;
  row_moments(recurrent, width, scratch, mean_hh, rstd_hh);
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    const auto pre = [&](int64_t offset) {
      const V normalized = (static_cast<V>(recurrent[offset + j]) - mean_hh) * rstd_hh;
      if constexpr (kTraining) {
        norm_hh[offset + j] = static_cast<scalar_t>(normalized);
      }
      return static_cast<V>(gates[offset + j]) + static_cast<V>(weight_hh[offset + j]) * normalized;
    };
    const V pre_i = pre(0);
    const GatePreActivations<V> pre_all{pre_i, coupled ? pre_i : pre(f_at), pre(g_at), pre(o_at)};
    const CellForwardResult<V> r = lstm_variant_state_unit(
        pre_all, static_cast<V>(c_prev[j]), variant_unit<V>(peephole, coupled, hidden, j));
    gates[j] = static_cast<scalar_t>(r.gates.i);
    if (!coupled) {
      gates[f_at + j] = static_cast<scalar_t>(r.gates.f);
    }
    gates[g_at + j] = static_cast<scalar_t>(r.gates.g);
    gates[o_at + j] = static_cast<scalar_t>(r.gates.o);
    h[j] = static_cast<scalar_t>(r.c);
  }
  __syncthreads();  // c_t of every unit parked in h before its moments are taken

  V mean_c, rstd_c;
  row_moments(static_cast<const scalar_t*>(h), hidden, scratch, mean_c, rstd_c);
  const auto* weight_c = static_cast<const scalar_t*>(ln.weight_c);
  const auto* bias_c = static_cast<const scalar_t*>(ln.bias_c);
  const auto* keep_h_mask = static_cast<const scalar_t*>(a.zoneout_h);
  const auto* keep_c_mask = static_cast<const scalar_t*>(a.zoneout_c);
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    const V c_new = static_cast<V>(h[j]);
    const V normalized = (c_new - mean_c) * rstd_c;
    const V c_out = static_cast<V>(weight_c[j]) * normalized + static_cast<V>(bias_c[j]);
    V h_new = static_cast<V>(gates[o_at + j]) * Activations<V>::tanh(c_out);
    V c = c_new;
    if (a.zoneout) {
      const V keep_c = keep_c_mask ? static_cast<V>(keep_c_mask[row + j]) : V(a.zoneout_p);
      const V keep_h = keep_h_mask ? static_cast<V>(keep_h_mask[row + j]) : V(a.zoneout_p);
      c = c_new + keep_c * (static_cast<V>(c_prev[j]) - c_new);
      h_new = h_new +
              keep_h * (static_cast<V>(static_cast<const scalar_t*>(a.h_prev)[row + j]) - h_new);
      if constexpr (kTraining) {
        static_cast<scalar_t*>(a.c_new)[row + j] = static_cast<scalar_t>(c_new);
      }
    }
    if constexpr (kTraining) {
      static_cast<scalar_t*>(ln.norm_c)[row + j] = static_cast<scalar_t>(normalized);
    }
    static_cast<scalar_t*>(a.c)[row + j] = static_cast<scalar_t>(c);
    h[j] = static_cast<scalar_t>(h_new);
  }
  if (kTraining && threadIdx.x == 0) {
    auto* rstd = static_cast<scalar_t*>(ln.rstd) + 2 * n;
    rstd[0] = static_cast<scalar_t>(rstd_hh);
    rstd[1] = static_cast<scalar_t>(rstd_c);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kLayerNormThreads)
    layer_norm_backward_step_kernel(const BackwardStepArgs a) {
  using V = at::opmath_type<scalar_t>;
  __shared__ V scratch[32];
  const int64_t n = blockIdx.x, hidden = a.hidden;
  const bool coupled = a.coupled;
  const int64_t width = (coupled ? 3 : 4) * hidden;
  const int64_t f_at = hidden, g_at = (coupled ? 1 : 2) * hidden, o_at = (coupled ? 2 : 3) * hidden;
  const auto& ln = a.ln;
  const int64_t row = n * hidden;
  const auto* gates = static_cast<const scalar_t*>(a.gates) + n * width;
  const auto* norm_hh = static_cast<const scalar_t*>(ln.norm_hh) + n * width;
  const auto* norm_c = static_cast<const scalar_t*>(ln.norm_c) + row;
  const auto* weight_hh = static_cast<const scalar_t*>(ln.weight_hh);
  const auto* weight_c = static_cast<const scalar_t*>(ln.weight_c);
  const auto* bias_c = static_cast<const scalar_t*>(ln.bias_c);
  const auto* peephole = static_cast<const scalar_t*>(a.peephole);
  const auto* keep_h_mask = static_cast<const scalar_t*>(a.zoneout_h);
  const auto* keep_c_mask = static_cast<const scalar_t*>(a.zoneout_c);
  auto* d_c_out = static_cast<scalar_t*>(ln.d_c_out) + row;
  auto* d_gates = static_cast<scalar_t*>(a.d_gates) + n * width;
  auto* d_c = static_cast<scalar_t*>(a.d_c) + row;
  const V rstd_hh = static_cast<V>(static_cast<const scalar_t*>(ln.rstd)[2 * n]);
  const V rstd_c = static_cast<V>(static_cast<const scalar_t*>(ln.rstd)[2 * n + 1]);
  // d_h_t's share not kept by zoneout, and the kept share.
  const auto split_d_h = [&](int64_t j, V& d_h, V& kept) {
    const V total = static_cast<V>(static_cast<const scalar_t*>(a.d_h_output)[row + j]) +
                    static_cast<V>(static_cast<const scalar_t*>(a.d_h_recurrent)[row + j]);
    const V keep_h = !a.zoneout ? V(0)
                     : keep_h_mask ? static_cast<V>(keep_h_mask[row + j])
                                   : V(a.zoneout_p);
    kept = keep_h * total;
    d_h = total - kept;
  };
  const auto tanh_c_out = [&](int64_t j) {
    return Activations<V>::tanh(static_cast<V>(weight_c[j]) * static_cast<V>(norm_c[j]) +
                                static_cast<V>(bias_c[j]));
  };

  V sum_d(0), sum_dn(0);
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    V d_h, kept;
    split_d_h(j, d_h, kept);
    const V t = tanh_c_out(j);
    const V d_out = d_h * static_cast<V>(gates[o_at + j]) * (V(1) - t * t);
    d_c_out[j] = static_cast<scalar_t>(d_out);
    const V d_normalized = d_out * static_cast<V>(weight_c[j]);
    sum_d += d_normalized;
    sum_dn += d_normalized * static_cast<V>(norm_c[j]);
  }
  const V mean_d_c = block_sum(sum_d, scratch) / static_cast<V>(hidden);
  const V mean_dn_c = block_sum(sum_dn, scratch) / static_cast<V>(hidden);

  V sum_d_hh(0), sum_dn_hh(0);
  for (int64_t j = threadIdx.x; j < hidden; j += blockDim.x) {
    V d_h, kept;
    split_d_h(j, d_h, kept);
    const V i = static_cast<V>(gates[j]), o = static_cast<V>(gates[o_at + j]);
    const GateActivations<V> act{i, coupled ? V(1) - i : static_cast<V>(gates[f_at + j]),
                                 static_cast<V>(gates[g_at + j]), o};
    const V t = tanh_c_out(j);
    const V d_o = d_h * t * o * (V(1) - o);
    const V d_c_ln = layer_norm_input_gradient(
        static_cast<V>(d_c_out[j]) * static_cast<V>(weight_c[j]), static_cast<V>(norm_c[j]),
        rstd_c, mean_d_c, mean_dn_c);
    V d_c_t = static_cast<V>(d_c[j]);
    V d_c_kept(0);
    if (a.zoneout) {
      const V keep_c = keep_c_mask ? static_cast<V>(keep_c_mask[row + j]) : V(a.zoneout_p);
      d_c_kept = keep_c * d_c_t;
      d_c_t = d_c_t - d_c_kept;
      // After this thread's last read of d_h_recurrent[j], which d_h_prev may alias.
      static_cast<scalar_t*>(a.d_h_prev)[row + j] = static_cast<scalar_t>(kept);
    }
    const CellBackwardResult<V> r = lstm_variant_gate_gradients(
        act, static_cast<V>(static_cast<const scalar_t*>(a.c_prev)[row + j]), d_o,
        d_c_t + d_c_ln, variant_unit<V>(peephole, coupled, hidden, j));
    d_c[j] = static_cast<scalar_t>(r.d_c_prev + d_c_kept);
    const auto gate = [&](int64_t offset, V d_pre) {
      d_gates[offset + j] = static_cast<scalar_t>(d_pre);
      const V d_normalized = d_pre * static_cast<V>(weight_hh[offset + j]);
      sum_d_hh += d_normalized;
      sum_dn_hh += d_normalized * static_cast<V>(norm_hh[offset + j]);
    };
    gate(0, r.d_i);
    if (!coupled) {
      gate(f_at, r.d_f);
    }
    gate(g_at, r.d_g);
    gate(o_at, r.d_o);
  }
  const V mean_d_hh = block_sum(sum_d_hh, scratch) / static_cast<V>(width);
  const V mean_dn_hh = block_sum(sum_dn_hh, scratch) / static_cast<V>(width);

  auto* d_recurrent = static_cast<scalar_t*>(ln.d_recurrent) + n * width;
  for (int64_t e = threadIdx.x; e < width; e += blockDim.x) {
    d_recurrent[e] = static_cast<scalar_t>(layer_norm_input_gradient(
        static_cast<V>(d_gates[e]) * static_cast<V>(weight_hh[e]), static_cast<V>(norm_hh[e]),
        rstd_hh, mean_d_hh, mean_dn_hh));
  }
}

// The GRU's passes (gates rows [r | z | n]). `d_h` is read and overwritten in place by the unit
// that owns the element (gradient of h_t in, the direct part of h_{t-1}'s out).
template <typename scalar_t, bool kTraining>
__global__ void __launch_bounds__(kThreadsPerBlock)
    gru_forward_step_kernel(scalar_t* __restrict__ gates, const scalar_t* __restrict__ recurrent,
                            const scalar_t* __restrict__ bias_hn,
                            const scalar_t* __restrict__ h_prev, scalar_t* __restrict__ hidden_n,
                            scalar_t* __restrict__ h, int64_t batch, int64_t hidden) {
  using V = at::opmath_type<scalar_t>;
  const int64_t units = batch * hidden;
  for (UnitCursor u(hidden); u.in(units); u.next()) {
    const int64_t k = u.unit();
    scalar_t* g = gates + u.gate_offset(3);
    const scalar_t* rec = recurrent + u.gate_offset(3);
    V h_n = static_cast<V>(rec[2 * hidden]);
    if (bias_hn != nullptr) {
      h_n += static_cast<V>(bias_hn[u.column()]);
    }
    const GruPreActivations<V> pre{static_cast<V>(g[0]) + static_cast<V>(rec[0]),
                                   static_cast<V>(g[hidden]) + static_cast<V>(rec[hidden]),
                                   static_cast<V>(g[2 * hidden]), h_n};
    const GruForwardResult<V> r = gru_cell_forward_unit(pre, static_cast<V>(h_prev[k]));
    h[k] = static_cast<scalar_t>(r.h);
    if constexpr (kTraining) {
      g[0] = static_cast<scalar_t>(r.gates.r);
      g[hidden] = static_cast<scalar_t>(r.gates.z);
      g[2 * hidden] = static_cast<scalar_t>(r.gates.n);
      hidden_n[k] = static_cast<scalar_t>(h_n);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    gru_backward_step_kernel(const scalar_t* __restrict__ gates,
                             const scalar_t* __restrict__ hidden_n,
                             const scalar_t* __restrict__ h_prev,
                             const scalar_t* __restrict__ d_h_output, scalar_t* __restrict__ d_h,
                             scalar_t* __restrict__ d_gates, scalar_t* __restrict__ d_input_n,
                             int64_t batch, int64_t hidden) {
  using V = at::opmath_type<scalar_t>;
  const int64_t units = batch * hidden;
  for (UnitCursor u(hidden); u.in(units); u.next()) {
    const int64_t k = u.unit();
    const scalar_t* a = gates + u.gate_offset(3);
    const GruActivations<V> act{static_cast<V>(a[0]), static_cast<V>(a[hidden]),
                                static_cast<V>(a[2 * hidden])};
    const V d_h_total = static_cast<V>(d_h_output[k]) + static_cast<V>(d_h[k]);
    const GruBackwardResult<V> r = gru_cell_backward_unit(
        act, static_cast<V>(hidden_n[k]), static_cast<V>(h_prev[k]), d_h_total);
    scalar_t* dg = d_gates + u.gate_offset(3);
    dg[0] = static_cast<scalar_t>(r.d_r);
    dg[hidden] = static_cast<scalar_t>(r.d_z);
    dg[2 * hidden] = static_cast<scalar_t>(r.d_hidden_n);
    d_input_n[k] = static_cast<scalar_t>(r.d_input_n);
    d_h[k] = static_cast<scalar_t>(r.d_h_prev);
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
  if (a.layer_norm) {
    const auto kernel = a.training ? &layer_norm_forward_step_kernel<scalar_t, true>
                                   : &layer_norm_forward_step_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned int>(a.batch), kLayerNormThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (a.peephole != nullptr || a.coupled || a.zoneout) {
    const auto kernel = a.training ? &variant_forward_step_kernel<scalar_t, true>
                                   : &variant_forward_step_kernel<scalar_t, false>;
    kernel<<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
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
  if (a.layer_norm) {
    layer_norm_backward_step_kernel<scalar_t>
        <<<static_cast<unsigned int>(a.batch), kLayerNormThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (a.peephole != nullptr || a.coupled || a.zoneout) {
    variant_backward_step_kernel<scalar_t><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  backward_step_kernel<scalar_t><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
      static_cast<const scalar_t*>(a.gates), static_cast<const scalar_t*>(a.c),
      static_cast<const scalar_t*>(a.c_prev), static_cast<const scalar_t*>(a.d_h_output),
      static_cast<const scalar_t*>(a.d_h_recurrent), static_cast<scalar_t*>(a.d_c),
      static_cast<scalar_t*>(a.d_gates), a.batch, a.hidden);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_gru_forward_step(const GruForwardStepArgs& a) {
  const int64_t units = a.batch * a.hidden;
  if (units == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto kernel = a.training ? &gru_forward_step_kernel<scalar_t, true>
                                 : &gru_forward_step_kernel<scalar_t, false>;
  kernel<<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
      static_cast<scalar_t*>(a.gates), static_cast<const scalar_t*>(a.recurrent),
      static_cast<const scalar_t*>(a.bias_hn), static_cast<const scalar_t*>(a.h_prev),
      static_cast<scalar_t*>(a.hidden_n), static_cast<scalar_t*>(a.h), a.batch, a.hidden);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_gru_backward_step(const GruBackwardStepArgs& a) {
  const int64_t units = a.batch * a.hidden;
  if (units == 0) {
    return;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  gru_backward_step_kernel<scalar_t><<<blocks_for(units), kThreadsPerBlock, 0, stream>>>(
      static_cast<const scalar_t*>(a.gates), static_cast<const scalar_t*>(a.hidden_n),
      static_cast<const scalar_t*>(a.h_prev), static_cast<const scalar_t*>(a.d_h_output),
      static_cast<scalar_t*>(a.d_h), static_cast<scalar_t*>(a.d_gates),
      static_cast<scalar_t*>(a.d_input_n), a.batch, a.hidden);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gru_forward_step(const GruForwardStepArgs& args, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(c10::kHalf, c10::kBFloat16, dtype,
                                  "lstm_ext_cuda_gru_forward_step",
                                  [&] { launch_gru_forward_step<scalar_t>(args); });
}

void gru_backward_step(const GruBackwardStepArgs& args, c10::ScalarType dtype) {
  AT_DISPATCH_FLOATING_TYPES_AND2(c10::kHalf, c10::kBFloat16, dtype,
                                  "lstm_ext_cuda_gru_backward_step",
                                  [&] { launch_gru_backward_step<scalar_t>(args); });
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

PointwiseKernels cuda_pointwise_kernels() {
  return {&forward_step, &backward_step, &gru_forward_step, &gru_backward_step};
}

}  // namespace lstm_ext::cuda
