// The CPU float32 StepBackend: the recurrent GEMM of each step fused with the step's pointwise
// pass, over W_hh packed once per call, and the large GEMMs on the same packed-B kernel. Every
// cell has its epilogues here: the LSTM's (with the variants' options: peepholes, coupled gates,
// zoneout) and the GRU's.
//
// A padded batch without projections runs each whole recurrence (forward_recurrence,
// backward_recurrence) in one parallel region whose threads own a share of the batch rows or of
// the hidden units for the whole sequence; from batch 16 on the forward step also computes its
// input projection. Packed batches and projections take the generic step loop of
// lstm_sequence.cpp through forward_step / recurrent_gradient, on the same kernels.
//
// Included by the per-instruction-set files (lstm_kernels_avx2.cpp, lstm_kernels_avx512.cpp) after
// lstm_pointwise_impl.h, inside which the gate math's SIMD activations are defined.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

#include "../common/lstm_sequence.h"
#include "lstm_pointwise_impl.h"
#include "narrow_gemm.h"
#include "packed_gemm.h"

namespace lstm_ext::cpu {
inline namespace CPU_CAPABILITY {

// Stores activations saved for backward, which are not read again before backward, long after:
// with `stream`, written around the cache where aligned (no read of each line before writing it,
// no eviction of the weights); the caller must then _mm_sfence() on every thread that stored
// before the buffer is read.
inline void store_saved(float* p, const FloatVec& v, int64_t count, bool stream) {
  if (stream && count == kVecWidth && reinterpret_cast<uintptr_t>(p) % sizeof(RawVec) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_ps(p, v);
#else
    _mm256_stream_ps(p, v);
#endif
  } else {
    store_units(p, v, count);
  }
}

// The epilogue of a forward step: the tile's accumulators are gate pre-activations of kVecWidth
// hidden units (B packed in gate order, so vector v of a tile is gate v); the last K block turns
// them into c_t and h_t in registers, and saves the activated gates when training.
struct LstmForwardOutput {
  float* gates;          // [N, 4H] pre-activations in (input projection and biases), out as
                         // above; null when the input projection is fused and not training
  const float* c_prev;   // [N, H]
  float* c;              // [N, H]
  float* h;              // [N, H]
  int64_t hidden;
  bool training;
  int64_t rows;  // N
  // Save the activations with streaming stores (save_units); only for callers that fence after.
  bool stream_saved = false;
  // The LSTM variants: peephole weights [3, H] or null; coupled gates, whose tiles hold i, g, o
  // in their first three vectors (B packed with the cell's GateLayout) and rows [N, 3H].
  const float* peephole = nullptr;
  bool coupled = false;
  // Zoneout (cell_math.h's LstmVariantUnit does not cover it: it mixes states, not gates): keep
  // masks [N, H] (training) or the keep probability (eval), h_{t-1} [N, H], and with training
  // c_new [N, H], c_t before zoneout.
  bool zoneout = false;
  const float* keep_h = nullptr;
  const float* keep_c = nullptr;
  float keep_p = 0.f;
  const float* h_prev = nullptr;
  float* c_new = nullptr;

  int64_t gate_vecs() const { return coupled ? 3 : 4; }
  float* gate_ptr(int64_t row, int64_t panel, int64_t vec) const {
    return gates + row * gate_vecs() * hidden + vec * hidden + panel * kVecWidth;
  }
  int64_t units(int64_t panel) const {
    return std::min<int64_t>(kVecWidth, hidden - panel * kVecWidth);
  }
  // See store_saved.
  void save_units(float* p, const FloatVec& v, int64_t count) const {
    store_saved(p, v, count, stream_saved);
  }

  // Requests the cache lines tile `tile` of `panel` reads outside the GEMM: its gate
  // pre-activations (written by the input projection long before, so not in cache) and c_{t-1}.
  void prefetch(int64_t tile, int64_t panel, bool /*last*/) const {
    const int64_t row_end = std::min((tile + 1) * kTileRows, rows);
    for (int64_t row = tile * kTileRows; row < row_end; ++row) {
      for (int64_t v = 0; v < gate_vecs(); ++v) {
        __builtin_prefetch(gate_ptr(row, panel, v));
      }
      __builtin_prefetch(c_prev + row * hidden + panel * kVecWidth);
    }
  }

  // A step always accumulates onto the input projection already in `gates`; init is never used.
  template <int64_t kRows>
  void init(int64_t, RawVec (&acc)[kRows][kPanelVecs]) const {
    for (auto& row : acc) {
      for (auto& v : row) v = raw_broadcast(0.f);
    }
  }
  template <int64_t kRows>
  void load(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    const int64_t count = units(panel);
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < kPanelVecs; ++v) {
        acc[r][v] = v < gate_vecs() ? RawVec(load_units(gate_ptr(row0 + r, panel, v), count))
                                    : raw_broadcast(0.f);
      }
    }
  }
  template <int64_t kRows>
  void store(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    const int64_t count = units(panel);
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < gate_vecs(); ++v) {
        store_units(gate_ptr(row0 + r, panel, v), FloatVec(acc[r][v]), count);
      }
    }
  }
  template <int64_t kRows>
  void finish(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    if (peephole != nullptr || coupled || zoneout) {
      finish_variant<kRows>(row0, panel, acc);
      return;
    }
    const int64_t count = units(panel);
    const int64_t j = panel * kVecWidth;
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      const GatePreActivations<FloatVec> pre{FloatVec(acc[r][0]), FloatVec(acc[r][1]),
                                             FloatVec(acc[r][2]), FloatVec(acc[r][3])};
      const CellForwardResult<FloatVec> result =
          lstm_cell_forward_unit(pre, load_units(c_prev + row * hidden + j, count));
      store_units(c + row * hidden + j, result.c, count);
      store_units(h + row * hidden + j, result.h, count);
      if (training) {
        save_units(gate_ptr(row, panel, 0), result.gates.i, count);
        save_units(gate_ptr(row, panel, 1), result.gates.f, count);
        save_units(gate_ptr(row, panel, 2), result.gates.g, count);
        save_units(gate_ptr(row, panel, 3), result.gates.o, count);
      }
    }
  }

  // finish for the LSTM variants (cell_math.h's lstm_variant_forward_unit).
  template <int64_t kRows>
  void finish_variant(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    const int64_t count = units(panel);
    const int64_t j = panel * kVecWidth;
    LstmVariantUnit<FloatVec> variant{peephole != nullptr, coupled, FloatVec(0.f), FloatVec(0.f),
                                      FloatVec(0.f)};
    if (peephole != nullptr) {
      variant.w_ci = load_units(peephole + j, count);
      variant.w_cf = load_units(peephole + hidden + j, count);
      variant.w_co = load_units(peephole + 2 * hidden + j, count);
    }
    // Where each gate's vector is in the tile: coupled gates have no f.
    const int64_t g_vec = coupled ? 1 : 2, o_vec = coupled ? 2 : 3;
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      const GatePreActivations<FloatVec> pre{FloatVec(acc[r][0]), FloatVec(acc[r][coupled ? 0 : 1]),
                                             FloatVec(acc[r][g_vec]), FloatVec(acc[r][o_vec])};
      const int64_t unit = row * hidden + j;
      // c may alias c_prev (inference's running state): read first.
      const FloatVec c_prev_v = load_units(c_prev + unit, count);
      const CellForwardResult<FloatVec> result = lstm_variant_forward_unit(pre, c_prev_v, variant);
      FloatVec c_t = result.c, h_t = result.h;
      if (zoneout) {
        const FloatVec m_c = keep_c != nullptr ? load_units(keep_c + unit, count) : FloatVec(keep_p);
        const FloatVec m_h = keep_h != nullptr ? load_units(keep_h + unit, count) : FloatVec(keep_p);
        c_t = result.c + m_c * (c_prev_v - result.c);
        h_t = result.h + m_h * (load_units(h_prev + unit, count) - result.h);
        if (training) {
          save_units(c_new + unit, result.c, count);
        }
      }
      store_units(c + unit, c_t, count);
      store_units(h + unit, h_t, count);
      if (training) {
        save_units(gate_ptr(row, panel, 0), result.gates.i, count);
        if (!coupled) {
          save_units(gate_ptr(row, panel, 1), result.gates.f, count);
        }
        save_units(gate_ptr(row, panel, g_vec), result.gates.g, count);
        save_units(gate_ptr(row, panel, o_vec), result.gates.o, count);
      }
    }
  }
};

// The epilogue of a backward step's recurrent GEMM, d_h [N, H] = d_gates_{t+1} W_hh, with B = W_hh
// packed plain (a tile's columns are kPanelWidth consecutive hidden units): the last K block adds
// the output's gradient to the tile and runs the backward gate math of its units, writing their
// d_gates and updating d_c in place. Partial sums of earlier K blocks go through `d_h`.
struct LstmBackwardOutput {
  PlainOutput d_h;        // [N, H] scratch for partial sums; holds grad_h_n before the first step
  const float* gates;     // [N, 4H] saved activations of step t
  const float* c;         // [N, H] c_t
  const float* c_prev;    // [N, H] c_{t-1}
  const float* d_output;  // [N, H] gradient of output[t]
  float* d_c;             // [N, H] in: gradient reaching c_t; out: gradient of c_{t-1}
  float* d_gates;         // [N, 4H] out
  int64_t hidden;

  int64_t rows;  // N
  // The LSTM variants, as LstmForwardOutput (coupled: gates and d_gates rows [N, 3H]). With
  // zoneout `c` is c_t before zoneout, and the epilogue writes the kept share keep_h * d_h_t of the
  // gradient into d_h for step t-1's GEMM to accumulate onto (the GEMMs then accumulate).
  const float* peephole = nullptr;
  bool coupled = false;
  bool zoneout = false;
  const float* keep_h = nullptr;
  const float* keep_c = nullptr;
  float keep_p = 0.f;

  int64_t gate_count() const { return coupled ? 3 : 4; }

  // Requests the cache lines the epilogue of tile `tile` of `panel` reads: the saved gates and
  // states of step t (written by the forward pass, long out of cache), d_output and d_c.
  void prefetch(int64_t tile, int64_t panel, bool last) const {
    if (!last) {
      return;
    }
    const int64_t row_end = std::min((tile + 1) * kTileRows, rows);
    for (int64_t row = tile * kTileRows; row < row_end; ++row) {
      for (int64_t v = 0; v < kPanelVecs; ++v) {
        const int64_t j = panel * kPanelWidth + v * kVecWidth;
        if (j >= hidden) {
          break;
        }
        const float* gates_row = gates + row * gate_count() * hidden + j;
        for (int64_t gate = 0; gate < gate_count(); ++gate) {
          __builtin_prefetch(gates_row + gate * hidden);
        }
        const int64_t unit = row * hidden + j;
        __builtin_prefetch(c + unit);
        __builtin_prefetch(c_prev + unit);
        __builtin_prefetch(d_output + unit);
        __builtin_prefetch(d_c + unit);
      }
    }
  }

  template <int64_t kRows>
  void init(int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    d_h.init<kRows>(panel, acc);
  }
  template <int64_t kRows>
  void load(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    d_h.load<kRows>(row0, panel, acc);
  }
  template <int64_t kRows>
  void store(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    d_h.store<kRows>(row0, panel, acc);
  }
  template <int64_t kRows>
  void finish(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    if (peephole != nullptr || coupled || zoneout) {
      finish_variant<kRows>(row0, panel, acc);
      return;
    }
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      for (int64_t v = 0; v < kPanelVecs; ++v) {
        const int64_t j = panel * kPanelWidth + v * kVecWidth;
        const int64_t count = std::min<int64_t>(kVecWidth, hidden - j);
        if (count <= 0) {
          break;
        }
        const auto load = [count](const float* p) { return load_units(p, count); };
        const auto store = [count](float* p, const FloatVec& x) { store_units(p, x, count); };
        const float* gates_row = gates + row * 4 * hidden + j;
        const GateActivations<FloatVec> act{load(gates_row), load(gates_row + hidden),
                                            load(gates_row + 2 * hidden),
                                            load(gates_row + 3 * hidden)};
        const int64_t unit = row * hidden + j;
        const FloatVec d_h_total = FloatVec(acc[r][v]) + load(d_output + unit);
        const CellBackwardResult<FloatVec> result = lstm_cell_backward_unit(
            act, load(c + unit), load(c_prev + unit), d_h_total, load(d_c + unit));
        float* d_gates_row = d_gates + row * 4 * hidden + j;
        store(d_gates_row, result.d_i);
        store(d_gates_row + hidden, result.d_f);
        store(d_gates_row + 2 * hidden, result.d_g);
        store(d_gates_row + 3 * hidden, result.d_o);
        store(d_c + unit, result.d_c_prev);
      }
    }
  }

  // finish for the LSTM variants (cell_math.h's lstm_variant_backward_unit).
  template <int64_t kRows>
  void finish_variant(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    const int64_t width = gate_count() * hidden;
    const int64_t g_at = (coupled ? 1 : 2) * hidden, o_at = (coupled ? 2 : 3) * hidden;
    for (int64_t v = 0; v < kPanelVecs; ++v) {
      const int64_t j = panel * kPanelWidth + v * kVecWidth;
      const int64_t count = std::min<int64_t>(kVecWidth, hidden - j);
      if (count <= 0) {
        break;
      }
      const auto load = [count](const float* p) { return load_units(p, count); };
      const auto store = [count](float* p, const FloatVec& x) { store_units(p, x, count); };
      LstmVariantUnit<FloatVec> variant{peephole != nullptr, coupled, FloatVec(0.f),
                                        FloatVec(0.f), FloatVec(0.f)};
      if (peephole != nullptr) {
        variant.w_ci = load(peephole + j);
        variant.w_cf = load(peephole + hidden + j);
        variant.w_co = load(peephole + 2 * hidden + j);
      }
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t row = row0 + r;
        const float* gates_row = gates + row * width + j;
        const FloatVec i = load(gates_row);
        const GateActivations<FloatVec> act{i, coupled ? FloatVec(1.f) - i : load(gates_row + hidden),
                                            load(gates_row + g_at), load(gates_row + o_at)};
        const int64_t unit = row * hidden + j;
        FloatVec d_h_total = FloatVec(acc[r][v]) + load(d_output + unit);
        FloatVec d_c_t = load(d_c + unit);
        FloatVec d_c_kept(0.f);
        if (zoneout) {
          const FloatVec m_h = keep_h != nullptr ? load(keep_h + unit) : FloatVec(keep_p);
          const FloatVec m_c = keep_c != nullptr ? load(keep_c + unit) : FloatVec(keep_p);
          store(d_h.c + row * d_h.ldc + j, m_h * d_h_total);
          d_h_total = d_h_total - m_h * d_h_total;
          d_c_kept = m_c * d_c_t;
          d_c_t = d_c_t - d_c_kept;
        }
        CellBackwardResult<FloatVec> result = lstm_variant_backward_unit(
            act, load(c + unit), load(c_prev + unit), d_h_total, d_c_t, variant);
        result.d_c_prev = result.d_c_prev + d_c_kept;
        float* d_gates_row = d_gates + row * width + j;
        store(d_gates_row, result.d_i);
        if (!coupled) {
          store(d_gates_row + hidden, result.d_f);
        }
        store(d_gates_row + g_at, result.d_g);
        store(d_gates_row + o_at, result.d_o);
        store(d_c + unit, result.d_c_prev);
      }
    }
  }
};

// The GRU's epilogue of a forward step, over W_hh^T packed in kGruGates order (three-vector
// panels): a tile's vectors 0-2 are the recurrent products of r, z and n of kVecWidth hidden units,
// and, when the step fuses its input projection (W_ih^T packed alike), vectors 0 and 1 hold the
// input's r and z products too and vector 3 the input half of n. The GEMM runs the whole K in
// registers (run_gru_tile), so the tile is never stored part-way.
struct GruForwardOutput {
  // [N, 3H] in: the input projection (b_ih and b_hr, b_hz folded in) unless fused; out when
  // training: the activated r, z, n. Null when the input projection is fused and not training.
  float* gates;
  const float* bias_hn;  // [H] b_hn, or null without biases
  const float* h_prev;   // [N, H] h_{t-1}
  float* hidden_n;       // [N, H] out when training: W_hn h_{t-1} + b_hn
  float* h;              // [N, H] out: h_t
  int64_t hidden;
  bool training;
  bool input_fused;
  // With the input projection fused: its biases [3H] (b_ih, b_hr and b_hz folded in), or null.
  const float* input_bias = nullptr;
  bool stream_saved = false;  // see store_saved

  float* gate_ptr(int64_t row, int64_t panel, int64_t gate) const {
    return gates + row * 3 * hidden + gate * hidden + panel * kVecWidth;
  }

  // The accumulators before the GEMMs: the input projection's biases when it is fused, else 0.
  template <int64_t kRows>
  void init(int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    RawVec start[kPanelVecs] = {raw_broadcast(0.f), raw_broadcast(0.f), raw_broadcast(0.f),
                                raw_broadcast(0.f)};
    if (input_fused && input_bias != nullptr) {
      const int64_t j = panel * kVecWidth;
      const int64_t count = std::min<int64_t>(kVecWidth, hidden - j);
      start[0] = load_units(input_bias + j, count);
      start[1] = load_units(input_bias + hidden + j, count);
      start[3] = load_units(input_bias + 2 * hidden + j, count);
    }
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t v = 0; v < kPanelVecs; ++v) acc[r][v] = start[v];
    }
  }

  template <int64_t kRows>
  void finish(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    const int64_t j = panel * kVecWidth;
    const int64_t count = std::min<int64_t>(kVecWidth, hidden - j);
    const FloatVec b_hn = bias_hn != nullptr ? load_units(bias_hn + j, count) : FloatVec(0.f);
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      const FloatVec hidden_n_v = FloatVec(acc[r][2]) + b_hn;
      GruPreActivations<FloatVec> pre{FloatVec(acc[r][0]), FloatVec(acc[r][1]),
                                      FloatVec(acc[r][3]), hidden_n_v};
      if (!input_fused) {
        pre.r = pre.r + load_units(gate_ptr(row, panel, 0), count);
        pre.z = pre.z + load_units(gate_ptr(row, panel, 1), count);
        pre.input_n = load_units(gate_ptr(row, panel, 2), count);
      }
      const int64_t unit = row * hidden + j;
      const GruForwardResult<FloatVec> result =
          gru_cell_forward_unit(pre, load_units(h_prev + unit, count));
      store_units(h + unit, result.h, count);
      if (training) {
        store_saved(gate_ptr(row, panel, 0), result.gates.r, count, stream_saved);
        store_saved(gate_ptr(row, panel, 1), result.gates.z, count, stream_saved);
        store_saved(gate_ptr(row, panel, 2), result.gates.n, count, stream_saved);
        store_saved(hidden_n + unit, hidden_n_v, count, stream_saved);
      }
    }
  }
};

// The GRU's epilogue of a backward step's recurrent GEMM, d_h [N, H] += d_gates_{t+1} W_hh (W_hh
// packed plain): d_h holds, before the GEMM, the direct part z * d_h of the gradient that step t+1
// passed to h_t (grad_h_n before the first step), so the GEMM accumulates onto it; the last K block
// adds the output's gradient and runs the backward gate math, writing d_gates, d_input_n and the
// direct part for step t-1 back into d_h.
struct GruBackwardOutput {
  PlainOutput d_h;          // [N, H]
  const float* gates;       // [N, 3H] saved r, z, n of step t
  const float* hidden_n;    // [N, H] saved W_hn h_{t-1} + b_hn
  const float* h_prev;      // [N, H] h_{t-1}
  const float* d_output;    // [N, H] gradient of output[t]
  float* d_gates;           // [N, 3H] out
  float* d_input_n;         // [N, H] out
  int64_t hidden;

  void prefetch(int64_t /*tile*/, int64_t /*panel*/, bool /*last*/) const {}
  template <int64_t kRows>
  void init(int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    d_h.init<kRows>(panel, acc);
  }
  template <int64_t kRows>
  void load(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    d_h.load<kRows>(row0, panel, acc);
  }
  template <int64_t kRows>
  void store(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    d_h.store<kRows>(row0, panel, acc);
  }
  template <int64_t kRows>
  void finish(int64_t row0, int64_t panel, RawVec (&acc)[kRows][kPanelVecs]) const {
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      for (int64_t v = 0; v < kPanelVecs; ++v) {
        const int64_t j = panel * kPanelWidth + v * kVecWidth;
        const int64_t count = std::min<int64_t>(kVecWidth, hidden - j);
        if (count <= 0) {
          break;
        }
        const auto load = [count](const float* p) { return load_units(p, count); };
        const auto store = [count](float* p, const FloatVec& x) { store_units(p, x, count); };
        const float* gates_row = gates + row * 3 * hidden + j;
        const GruActivations<FloatVec> act{load(gates_row), load(gates_row + hidden),
                                           load(gates_row + 2 * hidden)};
        const int64_t unit = row * hidden + j;
        const FloatVec d_h_total = FloatVec(acc[r][v]) + load(d_output + unit);
        const GruBackwardResult<FloatVec> result =
            gru_cell_backward_unit(act, load(hidden_n + unit), load(h_prev + unit), d_h_total);
        float* d_gates_row = d_gates + row * 3 * hidden + j;
        store(d_gates_row, result.d_r);
        store(d_gates_row + hidden, result.d_z);
        store(d_gates_row + 2 * hidden, result.d_hidden_n);
        store(d_input_n + unit, result.d_input_n);
        store(d_h.c + row * d_h.ldc + j, result.d_h_prev);
      }
    }
  }
};

// The rows of a batch never meet in a recurrence (row n of h_t needs only row n of h_{t-1}), so
// when every thread gets at least a full tile of rows, each runs its own rows through the whole
// sequence: no barrier between steps, and each reads only state it wrote itself. Otherwise (small
// batches) the threads split the hidden units, all rows each, and wait for each other after every
// step, since each step reads all of h_{t-1}.
inline bool splits_rows(int64_t batch, int64_t team) { return batch >= team * kTileRows; }

// Threads for a whole recurrence: as many as ATen may use, but no more than there are shares of
// work (panels, or tiles of batch rows), and only where a step's work outweighs a barrier (a
// fraction of a microsecond) by a wide margin.
inline int64_t recurrence_threads(int64_t flops_per_step, int64_t batch, int64_t panels) {
  constexpr int64_t kMinFlopsPerThread = 1 << 16;
  const int64_t wanted = std::max<int64_t>(1, flops_per_step / kMinFlopsPerThread);
  const int64_t shares = std::max(panels, batch / kTileRows);
  const int64_t threads = std::min({wanted, shares, static_cast<int64_t>(at::get_num_threads())});
  // A team that would meet at a barrier every step runs on one thread for a while after a
  // recurrence stalled (StepSync): its first stall alone costs a time slice (~4 ms).
  return threads > 1 && !splits_rows(batch, threads) && cores_recently_busy() ? 1 : threads;
}

// One thread's share of a recurrence: rows [row_begin, row_end) of the batch and panels
// [panel_begin, panel_end) of the weights, for every step.
struct RecurrenceShare {
  int64_t row_begin, row_end, panel_begin, panel_end;
  int64_t rows() const { return row_end - row_begin; }
};


inline RecurrenceShare recurrence_share(int64_t batch, int64_t panels, int64_t thread,
                                        int64_t team) {
  if (splits_rows(batch, team)) {
    return {batch * thread / team, batch * (thread + 1) / team, 0, panels};
  }
  return {0, batch, panels * thread / team, panels * (thread + 1) / team};
}

// Runs body(thread, threads) on `threads` threads that live for the whole call, so a recurrence
// pays for a barrier per step rather than for handing out each step's work anew. The team may be
// smaller than asked (one thread inside another parallel region); body gets its real size.
template <typename Body>
void run_on_threads(int64_t threads, const Body& body) {
  if (threads <= 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(static_cast<int>(threads))
  body(omp_get_thread_num(), omp_get_num_threads());
}

// Waits for the whole team of run_on_threads. A no-op for a team of one, which may be running
// outside any parallel region of its own (where an OpenMP barrier would bind to an outer one).
inline void team_barrier(int64_t threads) {
  if (threads > 1) {
#pragma omp barrier
  }
}

// What the threads of one recurrence share to hand its remaining steps to one of them; see
// StepSync.
struct HandOver {
  explicit HandOver(int64_t threads) : waits(static_cast<size_t>(std::max<int64_t>(threads, 1))) {
    for (auto& wait : waits) wait.store(0, std::memory_order_relaxed);
  }
  // The step after whose barrier only `survivor` runs on; max: not handed over.
  std::atomic<int64_t> from_step{std::numeric_limits<int64_t>::max()};
  std::atomic<int64_t> survivor{0};
  // Each thread's wait at its latest barrier, in nanoseconds.
  std::vector<std::atomic<int64_t>> waits;
};

// One thread's side of a recurrence's steps: the panels it runs, and the barrier that ends each
// step when the team splits panels (StepSync does nothing for a team that splits rows, which
// never waits).
//
// Why hand over: when another process takes a core, the thread sharing it is descheduled for
// whole time slices and every barrier waits for it (T50 N1 H128 training with one busy process on
// 2 cores: 3.56 ms on two threads, 1.55 ms on one, torch 1.56). So thread 0 watches the waits,
// and once one far exceeds a step's work, the thread that waited longest (the one that had a
// core) runs every panel of the remaining steps alone, with no barrier; and recurrences that
// start in the next 100 ms take one thread from the outset (cores_recently_busy). Each panel's
// sums are the same whichever thread runs it, so the results stay bitwise the same.
// LSTM_EXT_HAND_OVER_AT_STEP=k forces the hand-over after step k, to the team's last thread (for
// tests).
class StepSync {
 public:
  StepSync(HandOver& shared, RecurrenceShare& share, int64_t panels, int64_t thread, int64_t team,
           bool splits_panels)
      : shared_(shared), share_(share), panels_(panels), thread_(thread), team_(team),
        barrier_(splits_panels && team > 1), step_start_(Clock::now()) {}

  // After the thread's share of step k. False: the rest of the sequence went to another thread,
  // and this one must stop (run no further step nor anything after the steps).
  bool end_step(int64_t k) {
    if (!barrier_) {
      return true;
    }
    const Clock::time_point arrived = Clock::now();
    if (thread_ == 0) {
      consider_hand_over(k, nanoseconds(arrived - step_start_));
    }
    team_barrier(team_);
    const Clock::time_point left = Clock::now();
    shared_.waits[static_cast<size_t>(thread_)].store(nanoseconds(left - arrived),
                                                      std::memory_order_relaxed);
    // Read after the barrier, and only for a decision made before it: a thread that is late
    // reading the previous step's decision must not act on this one's.
    if (k >= shared_.from_step.load(std::memory_order_acquire)) {
      barrier_ = false;
      if (thread_ != shared_.survivor.load(std::memory_order_relaxed)) {
        return false;
      }
      share_.panel_begin = 0;
      share_.panel_end = panels_;
    }
    step_start_ = left;
    return true;
  }

 private:
  using Clock = std::chrono::steady_clock;
  // A wait is a stall when it exceeds both this many of the quickest step's work and this floor
  // (jitter and a thread's wake-up take microseconds; a descheduled thread costs a time slice,
  // ~4 ms). The first steps' waits include the team's start, and are not judged.
  static constexpr int64_t kStallFactor = 8;
  static constexpr int64_t kMinStallNs = 1'000'000;
  static constexpr int64_t kFirstJudgedStep = 2;

  static int64_t nanoseconds(Clock::duration d) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
  }

  static int64_t forced_step() {
    static const int64_t step = [] {
      const char* value = std::getenv("LSTM_EXT_HAND_OVER_AT_STEP");
      return value != nullptr ? std::atoll(value) : int64_t{-1};
    }();
    return step;
  }

  // Thread 0, before step k's barrier: the waits the threads last reported against its own work.
  void consider_hand_over(int64_t k, int64_t work_ns) {
    min_work_ns_ = std::min(min_work_ns_, work_ns);
    int64_t longest = 0, waiter = 0;
    for (int64_t i = 0; i < team_; ++i) {
      const int64_t wait = shared_.waits[static_cast<size_t>(i)].load(std::memory_order_relaxed);
      if (wait > longest) {
        longest = wait;
        waiter = i;
      }
    }
    bool hand_over = false;
    if (forced_step() >= 0) {
      hand_over = k == forced_step();
      waiter = team_ - 1;
    } else if (k >= kFirstJudgedStep && longest > kMinStallNs &&
               longest > kStallFactor * min_work_ns_) {
      hand_over = true;
    }
    if (hand_over) {
      // Forced ones too, so that tests also run what follows a stall (cores_recently_busy).
      last_stall_ns().store(steady_now_ns(), std::memory_order_relaxed);
      shared_.survivor.store(waiter, std::memory_order_relaxed);
      shared_.from_step.store(k, std::memory_order_release);
    }
  }

  HandOver& shared_;
  RecurrenceShare& share_;
  const int64_t panels_, thread_, team_;
  bool barrier_;
  Clock::time_point step_start_;
  int64_t min_work_ns_ = std::numeric_limits<int64_t>::max();
};

// How W_hh^T (and W_ih^T when an LSTM step fuses its input projection) is packed in gate order.
inline GateLayout recurrent_gate_layout(Cell cell) {
  switch (cell) {
    case Cell::kLstm:
      return kLstmGates;
    case Cell::kLstmCoupled:
      return GateLayout{3, {0, 1, 2, -1}};  // i, g, o
    case Cell::kGru:
      return kGruGates;
  }
  return kLstmGates;
}

// Rows [r0, ...) of step t in a [T*N, H] buffer, or null.
inline const float* rows_at(const void* buffer, int64_t t, int64_t batch, int64_t r0,
                            int64_t hidden) {
  return buffer != nullptr ? static_cast<const float*>(buffer) + (t * batch + r0) * hidden
                           : nullptr;
}

// What step k of a whole forward recurrence reads and writes, for the share of rows starting
// at r0: every pointer starts at that row.
struct ForwardStepView {
  int64_t t;              // the step's time index
  const float* h_prev;    // h_{t-1} rows
  LstmForwardOutput out;  // its epilogue (gates, c_{t-1}, c_t, h_t)
};
inline ForwardStepView forward_step_view(const ForwardRecurrenceArgs& args, int64_t k,
                                         int64_t r0, int64_t rows) {
  const int64_t batch = args.batch, hidden = args.hidden;
  const auto* h0 = static_cast<const float*>(args.h0);
  const auto* c0 = static_cast<const float*>(args.c0);
  auto* gates = static_cast<float*>(args.gates);
  auto* output = static_cast<float*>(args.output);
  auto* cells = static_cast<float*>(args.cells);
  const int64_t t = step_time(k, args.steps, args.reverse);
  const int64_t prev_t = step_time(k - 1, args.steps, args.reverse);
  const float* h_prev = (k == 0 ? h0 : output + prev_t * batch * hidden) + r0 * hidden;
  // Inference keeps one running cell state, updated in place.
  const float* c_prev = (!args.training ? cells
                         : k == 0       ? c0
                                        : cells + prev_t * batch * hidden) +
                        r0 * hidden;
  float* c = (args.training ? cells + t * batch * hidden : cells) + r0 * hidden;
  // gates is null when the input projection is fused and not training.
  const bool coupled = args.cell == Cell::kLstmCoupled;
  const int64_t width = gate_count(args.cell) * hidden;
  float* step_gates = gates != nullptr ? gates + (t * batch + r0) * width : nullptr;
  return {t,
          h_prev,
          LstmForwardOutput{step_gates, c_prev, c, output + (t * batch + r0) * hidden, hidden,
                            args.training, rows, /*stream_saved=*/true,
                            static_cast<const float*>(args.peephole), coupled,
                            args.zoneout, rows_at(args.keep_h, t, batch, r0, hidden),
                            rows_at(args.keep_c, t, batch, r0, hidden),
                            static_cast<float>(args.keep_p), h_prev,
                            args.training && args.zoneout
                                ? static_cast<float*>(args.c_new) + (t * batch + r0) * hidden
                                : nullptr}};
}

class FusedFloatBackend final : public StepBackend {
 public:
  explicit FusedFloatBackend(const PointwiseKernels& kernels) : StepBackend(kernels) {}

  // Whether a product with `cols` output columns wastes too much of the packed GEMM's panels
  // (whole kPanelWidth columns each): a 2-feature input's dX or dW_ih would compute 64 columns to
  // keep 2. Those go to narrow_gemm.h.
  static bool too_narrow(int64_t cols) {
    const int64_t padded = (cols + kPanelWidth - 1) / kPanelWidth * kPanelWidth;
    return 2 * padded > 3 * cols;
  }

  void matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool accumulate) override {
    if (a.size(1) == 0 || !out.is_contiguous()) {
      StepBackend::matmul(a, b, out, accumulate);
      return;
    }
    if (too_narrow(b.size(1))) {
      if (a.stride(1) == 1) {
        narrow_product(a.const_data_ptr<float>(), a.stride(0), a.size(0), a.size(1), b,
                       out.data_ptr<float>(), out.stride(0), accumulate);
        return;
      }
      if (a.stride(0) == 1 && b.stride(1) == 1) {  // a = D^T, D row-major: a weight gradient
        narrow_transposed_product(a.const_data_ptr<float>(), a.stride(1), a.size(1), a.size(0),
                                  b.const_data_ptr<float>(), b.stride(0), b.size(1),
                                  out.data_ptr<float>(), out.stride(0), accumulate, nullptr);
        return;
      }
      StepBackend::matmul(a, b, out, accumulate);
      return;
    }
    const PackedB packed =
        plain_b(b.const_data_ptr<float>(), b.stride(0), b.stride(1), b.size(0), b.size(1));
    const OperandA a_operand{a.const_data_ptr<float>(), a.stride(0), a.stride(1)};
    packed_gemm(a_operand, a.size(0), packed, PlainOutput{out.data_ptr<float>(), out.stride(0), &packed},
                accumulate);
  }

  // One pass over d_gates for both: the bias gradient is summed while the GEMM copies blocks of
  // d_gates^T (see a_block), instead of a separate reduction reading all of d_gates again.
  void weight_gradient(const at::Tensor& d_gates, const at::Tensor& x, at::Tensor& grad_w,
                       at::Tensor* grad_bias) override {
    const OperandA a_operand{d_gates.const_data_ptr<float>(), d_gates.stride(1),
                             d_gates.stride(0)};
    if (x.size(1) == 0 || d_gates.size(0) == 0 || !grad_w.is_contiguous() ||
        !copies_a_blocks(a_operand) || x.stride(1) != 1) {
      StepBackend::weight_gradient(d_gates, x, grad_w, grad_bias);
      return;
    }
    if (grad_bias != nullptr) {
      *grad_bias = at::zeros({d_gates.size(1)}, d_gates.options());
    }
    float* sums = grad_bias != nullptr ? grad_bias->data_ptr<float>() : nullptr;
    if (too_narrow(x.size(1))) {
      narrow_transposed_product(d_gates.const_data_ptr<float>(), d_gates.stride(0),
                                d_gates.size(0), d_gates.size(1), x.const_data_ptr<float>(),
                                x.stride(0), x.size(1), grad_w.data_ptr<float>(),
                                grad_w.stride(0), /*accumulate=*/false, sums);
      return;
    }
    const PackedB packed =
        plain_b(x.const_data_ptr<float>(), x.stride(0), x.stride(1), x.size(0), x.size(1));
    packed_gemm(a_operand, d_gates.size(1), packed,
                PlainOutput{grad_w.data_ptr<float>(), grad_w.stride(0), &packed},
                /*accumulate=*/false, sums);
  }

  // W_hh is [4H, K] with K the width of h_{t-1}: H, or the projection size once projections
  // exist. Both packings below keep the two apart.
  void project_input(const at::Tensor& x, const at::Tensor& w_ih,
                     const std::optional<at::Tensor>& bias, at::Tensor& out) override {
    if (x.size(1) == 0 || !out.is_contiguous()) {
      StepBackend::project_input(x, w_ih, bias, out);
      return;
    }
    // B = W_ih^T: element (k, col) = w_ih[col][k]. The bias seeds the accumulators, so the output
    // is written once rather than filled with the bias first.
    const PackedB packed = pack_b(w_ih.const_data_ptr<float>(), w_ih.stride(1), w_ih.stride(0),
                                  w_ih.size(1), w_ih.size(0), ColumnOrder::kPlain);
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    const PlainOutput output{out.data_ptr<float>(), out.stride(0), &packed,
                             bias_c.defined() ? bias_c.const_data_ptr<float>() : nullptr};
    const OperandA a_operand{x.const_data_ptr<float>(), x.stride(0), x.stride(1)};
    packed_gemm(a_operand, x.size(0), packed, output, /*accumulate=*/false);
  }

  void begin_forward(const at::Tensor& w_hh, Cell cell) override {
    StepBackend::begin_forward(w_hh, cell);
    packed_w_hh_ = PackedB();
    plain_w_hh_t_ = PackedB();
    hidden_ = w_hh.size(0) / gate_count(cell);
    if (hidden_ > 0 && w_hh.size(1) > 0) {
      // B = W_hh^T: element (k, col) = w_hh[col][k]; gate order for the fused epilogue.
      packed_w_hh_ = pack_b(w_hh.const_data_ptr<float>(), /*k_stride=*/1,
                            /*col_stride=*/w_hh.stride(0), w_hh.size(1), w_hh.size(0),
                            ColumnOrder::kGates, recurrent_gate_layout(cell),
                            cell == Cell::kGru ? 3 : kPanelVecs);
    }
  }

  void forward_step(const at::Tensor& h_prev, at::Tensor& gates, const at::Tensor& c_prev,
                    at::Tensor& c, at::Tensor& h, bool training) override {
    if (!is_lstm(cell_) || packed_w_hh_.k == 0 || packed_w_hh_.panels == 0) {
      StepBackend::forward_step(h_prev, gates, c_prev, c, h, training);
      return;
    }
    if (gates.size(0) == 0) {
      return;
    }
    const LstmForwardOutput out{gates.data_ptr<float>(),
                                c_prev.const_data_ptr<float>(),
                                c.data_ptr<float>(),
                                h.data_ptr<float>(),
                                hidden_,
                                training,
                                gates.size(0),
                                /*stream_saved=*/false,
                                peephole_ptr(),
                                cell_ == Cell::kLstmCoupled};
    const OperandA a_operand{h_prev.const_data_ptr<float>(), h_prev.stride(0), h_prev.stride(1)};
    packed_gemm(a_operand, gates.size(0), packed_w_hh_, out, /*accumulate=*/true);
  }

  // The layer-norm step's product, h_{t-1} W_hh^T with its columns in plain order (the
  // normalization reads whole rows): W_hh^T packed in that order on the first step, and the
  // packed GEMM over ATen's threads, about twice as fast as ATen's GEMM for these few rows.
  void recurrent_product(const at::Tensor& h_prev, at::Tensor& out) override {
    const at::Tensor& w_hh = w_hh_;
    if (h_prev.size(0) == 0 || w_hh.size(1) == 0 || w_hh.size(0) == 0 || !out.is_contiguous()) {
      StepBackend::recurrent_product(h_prev, out);
      return;
    }
    if (plain_w_hh_t_.k == 0) {
      // B = W_hh^T: element (k, col) = w_hh[col][k].
      plain_w_hh_t_ = pack_b(w_hh.const_data_ptr<float>(), w_hh.stride(1), w_hh.stride(0),
                             w_hh.size(1), w_hh.size(0), ColumnOrder::kPlain);
    }
    const OperandA a_operand{h_prev.const_data_ptr<float>(), h_prev.stride(0), h_prev.stride(1)};
    packed_gemm(a_operand, h_prev.size(0), plain_w_hh_t_,
                PlainOutput{out.data_ptr<float>(), out.stride(0), &plain_w_hh_t_},
                /*accumulate=*/false);
  }

  // The GRU's step of the generic loop (packed batches): the tiles of run_gru_tile over ATen's
  // threads, split over panels.
  void gru_forward_step(const at::Tensor& h_prev, at::Tensor& gates, const at::Tensor& bias_hn,
                        at::Tensor& hidden_n, at::Tensor& h, bool training) override {
    const PackedB& b = packed_w_hh_;
    if (b.k == 0 || b.panels == 0) {
      StepBackend::gru_forward_step(h_prev, gates, bias_hn, hidden_n, h, training);
      return;
    }
    const int64_t rows = gates.size(0);
    if (rows == 0) {
      return;
    }
    const GruForwardOutput out{gates.data_ptr<float>(),
                               bias_hn.defined() ? bias_hn.const_data_ptr<float>() : nullptr,
                               h_prev.const_data_ptr<float>(),
                               training ? hidden_n.data_ptr<float>() : nullptr,
                               h.data_ptr<float>(),
                               hidden_,
                               training,
                               /*input_fused=*/false};
    // The epilogue reads h_{t-1} as rows of H floats (every state buffer of the loop is).
    TORCH_INTERNAL_ASSERT(h_prev.stride(0) == hidden_ && h_prev.stride(1) == 1);
    const float* h_rows = h_prev.const_data_ptr<float>();
    constexpr int64_t kMinFlopsPerTask = 1 << 20;
    const int64_t grain = std::max<int64_t>(1, kMinFlopsPerTask / (2 * rows * b.k * kPanelWidth));
    parallel_for_unless_busy(0, b.panels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t row0 = 0; row0 < rows; row0 += kTileRows) {
          run_gru_tile(nullptr, nullptr, OperandA{h_rows + row0 * hidden_, hidden_, 1}, b, out,
                       row0, std::min(kTileRows, rows - row0), p);
        }
      }
    });
  }

  // Each thread owns a fixed range of panels (hidden units, all four gates of each) for the whole
  // sequence: its slice of W_hh stays in its own cache, and a step ends with one barrier, after
  // which every thread reads the whole h_t.
  bool forward_recurrence(const ForwardRecurrenceArgs& args) override {
    if (args.cell == Cell::kGru) {
      return gru_forward_recurrence(args);
    }
    if (args.input != nullptr) {
      forward_recurrence_with_input(args);
      return true;
    }
    const PackedB& b = packed_w_hh_;
    if (!is_lstm(args.cell) || b.k == 0 || b.panels == 0 || args.batch == 0) {
      return false;
    }
    const int64_t batch = args.batch;
    const int64_t threads = recurrence_threads(2 * batch * b.k * b.cols, batch, b.panels);
    HandOver hand_over(threads);
    run_on_threads(threads, [&](int64_t thread, int64_t team) {
      RecurrenceShare share = recurrence_share(batch, b.panels, thread, team);
      StepSync sync(hand_over, share, b.panels, thread, team, !splits_rows(batch, team));
      const int64_t r0 = share.row_begin;
      for (int64_t k = 0; k < args.steps; ++k) {
        const ForwardStepView step = forward_step_view(args, k, r0, share.rows());
        packed_gemm_panels(OperandA{step.h_prev, b.k, 1}, share.rows(), b, step.out,
                           /*accumulate=*/true, share.panel_begin, share.panel_end);
        if (!sync.end_step(k)) {
          break;
        }
      }
      _mm_sfence();  // the saved activations' streaming stores (LstmForwardOutput::save_units)
    });
    return true;
  }

  // From this batch size on, a step has rows enough to multiply x_t by W_ih as efficiently as
  // one GEMM over all steps would, and fusing saves writing the [T*N, 4H] pre-activations and
  // reading them back (in inference they are then never stored at all). Below it, W_ih would be
  // streamed through the cache T times for a few rows each time.
  static constexpr int64_t kMinBatchToFuseInput = 16;
  // The GRU's tiles run the whole K in registers rather than in kBlockK blocks (its epilogue has
  // no place for partial sums); fine while a panel's K rows stay in L2, which larger W_hh (and
  // inputs) would not. Past this, the generic loop runs the GRU on ATen's GEMMs.
  static constexpr int64_t kMaxGruFusedK = 2048;

  // A fused step streams W_ih as well as W_hh, for only `batch` rows. While both fit in the
  // last-level cache a core reaches quickly that is cheaper than storing and re-reading the
  // pre-activations; past it (H = 1024: 32 MB for the LSTM, 24 MB for the GRU) every step pays for
  // the weights twice over, and one GEMM over all steps, compute-bound, wins: measured 1.08-1.23x
  // faster unfused at H = 1024, N = 20-64 on a Zen 4 (1 MB L2) and a Xeon (2 MB L2), while up to
  // H = 512 (8 MB) fusing stayed ahead or level on both. From a batch of 128 the weights are
  // amortized over rows enough that fusing is level again (0.95-1.01x unfused).
  static constexpr int64_t kMaxFusedWeightBytes = int64_t{16} << 20;
  static constexpr int64_t kMinBatchToFuseLargeWeights = 128;

  bool fuses_input_projection(Cell cell, int64_t batch, int64_t features,
                              int64_t hidden) const override {
    if (batch < kMinBatchToFuseInput || features <= 0 || hidden <= 0 ||
        (cell != Cell::kLstm && hidden > kMaxGruFusedK)) {
      return false;
    }
    const int64_t weight_bytes =
        gate_count(cell) * hidden * (features + hidden) * static_cast<int64_t>(sizeof(float));
    return weight_bytes <= kMaxFusedWeightBytes || batch >= kMinBatchToFuseLargeWeights;
  }

  void begin_backward(const at::Tensor& w_hh, Cell cell) override {
    StepBackend::begin_backward(w_hh, cell);
    packed_w_hh_ = PackedB();
    if (w_hh.size(0) > 0 && w_hh.size(1) > 0) {
      // B = W_hh [4H, K] as it is stored.
      packed_w_hh_ = pack_b(w_hh.const_data_ptr<float>(), /*k_stride=*/w_hh.stride(0),
                            /*col_stride=*/1, w_hh.size(0), w_hh.size(1), ColumnOrder::kPlain);
    }
  }

  // As forward_recurrence, each thread owning a range of hidden units: a step's recurrent GEMM
  // (d_h_t from the d_gates of the step processed before) ends in the backward gate math of the
  // thread's units, then a barrier.
  bool backward_recurrence(const BackwardRecurrenceArgs& args) override {
    const PackedB& b = packed_w_hh_;
    if (b.k == 0 || b.panels == 0 || args.batch == 0) {
      return false;
    }
    if (args.cell == Cell::kGru) {
      gru_backward_recurrence(args);
      return true;
    }
    const int64_t batch = args.batch, hidden = args.hidden;
    const bool coupled = args.cell == Cell::kLstmCoupled;
    const int64_t width = gate_count(args.cell) * hidden;  // of a gates row
    const int64_t gate_stride = batch * width, state_stride = batch * hidden;
    const auto* gates = static_cast<const float*>(args.gates);
    const auto* cells = static_cast<const float*>(args.cells);
    const auto* c0 = static_cast<const float*>(args.c0);
    const auto* peephole = static_cast<const float*>(args.peephole);
    // Zoneout: c_t before zoneout (the saved cells are the kept c_t), and GEMMs that accumulate
    // onto the kept share of the gradient each epilogue leaves in d_h.
    const auto* cells_new = static_cast<const float*>(args.c_new);
    const bool zoneout = args.zoneout;
    const auto rows_of = [&](const void* buffer, int64_t t, int64_t r0) {
      return buffer != nullptr ? static_cast<const float*>(buffer) + t * state_stride + r0 * hidden
                               : nullptr;
    };
    const auto* d_output = static_cast<const float*>(args.d_output);
    auto* d_gates = static_cast<float*>(args.d_gates);
    auto* d_c = static_cast<float*>(args.d_c);
    run_backward_recurrence(args, width, /*accumulate=*/zoneout,
                            [&](int64_t t, int64_t forward_k, int64_t r0, int64_t rows,
                                const PlainOutput& d_h_out) {
      const float* c_prev =
          (forward_k == 0 ? c0
                          : cells + step_time(forward_k - 1, args.steps, args.reverse) * state_stride) +
          r0 * hidden;
      return LstmBackwardOutput{d_h_out,
                                gates + t * gate_stride + r0 * width,
                                (zoneout ? cells_new : cells) + t * state_stride + r0 * hidden,
                                c_prev,
                                d_output + t * state_stride + r0 * hidden,
                                d_c + r0 * hidden,
                                d_gates + t * gate_stride + r0 * width,
                                hidden,
                                rows,
                                peephole,
                                coupled,
                                zoneout,
                                rows_of(args.keep_h, t, r0),
                                rows_of(args.keep_c, t, r0),
                                static_cast<float>(args.keep_p)};
    });
    return true;
  }

  void recurrent_gradient(const at::Tensor& d_gates, at::Tensor& d_h, bool accumulate) override {
    if (packed_w_hh_.k == 0 || packed_w_hh_.panels == 0) {
      StepBackend::recurrent_gradient(d_gates, d_h, accumulate);
      return;
    }
    const OperandA a_operand{d_gates.const_data_ptr<float>(), d_gates.stride(0), d_gates.stride(1)};
    packed_gemm(a_operand, d_gates.size(0), packed_w_hh_,
                PlainOutput{d_h.data_ptr<float>(), d_h.stride(0), &packed_w_hh_}, accumulate);
  }

 private:
  // forward_recurrence when the backend fuses the input projection: each step's tile is
  // bias + x_t W_ih^T + h_{t-1} W_hh^T, accumulated in registers over the whole K of both (no
  // partial sums in memory), then the LSTM epilogue. Threads share the work as in
  // forward_recurrence.
  void forward_recurrence_with_input(const ForwardRecurrenceArgs& args) {
    const int64_t batch = args.batch, hidden = args.hidden, features = args.features;
    // B = W_ih^T in gate order, like W_hh: element (k, col) = w_ih[col][k].
    const PackedB w_ih = pack_b(static_cast<const float*>(args.w_ih), /*k_stride=*/1,
                                /*col_stride=*/features, features, gate_count(args.cell) * hidden,
                                ColumnOrder::kGates, recurrent_gate_layout(args.cell));
    const PackedB& w_hh = packed_w_hh_;
    const auto* input = static_cast<const float*>(args.input);
    const PlainOutput bias{nullptr, 0, &w_ih, static_cast<const float*>(args.bias)};
    const int64_t threads =
        recurrence_threads(2 * batch * (features + hidden) * 4 * hidden, batch, w_hh.panels);
    HandOver hand_over(threads);
    run_on_threads(threads, [&](int64_t thread, int64_t team) {
      RecurrenceShare share = recurrence_share(batch, w_hh.panels, thread, team);
      StepSync sync(hand_over, share, w_hh.panels, thread, team, !splits_rows(batch, team));
      const int64_t r0 = share.row_begin, rows = share.rows();
      const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
      for (int64_t k = 0; k < args.steps; ++k) {
        const ForwardStepView step = forward_step_view(args, k, r0, rows);
        const float* x_t = input + (step.t * batch + r0) * features;
        const float* h_prev = step.h_prev;
        const LstmForwardOutput& out = step.out;
        // Blocks of rows whose x_t and h_{t-1} rows stay in L2 while the panels (W_ih and W_hh,
        // from L3 when they exceed L2) pass over them.
        for (int64_t t0 = 0; t0 < row_tiles; t0 += kBlockTiles) {
          const int64_t t1 = std::min(row_tiles, t0 + kBlockTiles);
          for (int64_t p = share.panel_begin; p < share.panel_end; ++p) {
            for (int64_t tile = t0; tile < t1; ++tile) {
              const int64_t row0 = tile * kTileRows;
              run_input_fused_tile(OperandA{x_t + row0 * features, features, 1}, w_ih,
                                   OperandA{h_prev + row0 * hidden, hidden, 1}, w_hh, bias, out,
                                   row0, std::min(kTileRows, rows - row0), p);
            }
          }
        }
        if (!sync.end_step(k)) {
          break;
        }
      }
      _mm_sfence();  // the saved activations' streaming stores (LstmForwardOutput::save_units)
    });
  }

  template <int64_t kRows = kTileRows>
  static void run_input_fused_tile(const OperandA& x, const PackedB& w_ih, const OperandA& h,
                                   const PackedB& w_hh, const PlainOutput& bias,
                                   const LstmForwardOutput& out, int64_t row0, int64_t rows,
                                   int64_t panel) {
    if constexpr (kRows > 1) {
      if (rows < kRows) {
        run_input_fused_tile<kRows - 1>(x, w_ih, h, w_hh, bias, out, row0, rows, panel);
        return;
      }
    }
    RawVec acc[kRows][kPanelVecs];
    bias.init<kRows>(panel, acc);
    tile_multiply<kRows>(x, w_ih.k, w_ih.panel(panel), w_ih.k_stride, acc);
    tile_multiply<kRows>(h, w_hh.k, w_hh.panel(panel), w_hh.k_stride, acc);
    out.finish<kRows>(row0, panel, acc);
  }

  // One tile of a GRU step: acc = bias + x_t W_ih^T (when the input projection is fused; its n
  // half into vector 3) + h_{t-1} W_hh^T over the whole K, then the GRU epilogue. Both B operands
  // are three-vector panels (kGruGates).
  template <int64_t kRows = kTileRows>
  static void run_gru_tile(const OperandA* x, const PackedB* w_ih, const OperandA& h,
                           const PackedB& w_hh, const GruForwardOutput& out, int64_t row0,
                           int64_t rows, int64_t panel) {
    if constexpr (kRows > 1) {
      if (rows < kRows) {
        run_gru_tile<kRows - 1>(x, w_ih, h, w_hh, out, row0, rows, panel);
        return;
      }
    }
    RawVec acc[kRows][kPanelVecs];
    out.init<kRows>(panel, acc);
    if (x != nullptr) {
      tile_multiply3<kRows, 0, 1, 3>(*x, w_ih->k, w_ih->panel(panel), w_ih->k_stride, acc);
    }
    tile_multiply3<kRows, 0, 1, 2>(h, w_hh.k, w_hh.panel(panel), w_hh.k_stride, acc);
    out.finish<kRows>(row0, panel, acc);
  }

  // The GRU's whole forward recurrence, threads sharing the work as in forward_recurrence; with
  // fuses_input_projection, each step's tiles also multiply x_t by W_ih^T.
  bool gru_forward_recurrence(const ForwardRecurrenceArgs& args) {
    const PackedB& w_hh = packed_w_hh_;
    const int64_t batch = args.batch, hidden = args.hidden, features = args.features;
    if (w_hh.k == 0 || w_hh.panels == 0 || batch == 0 || hidden > kMaxGruFusedK) {
      TORCH_INTERNAL_ASSERT(args.input == nullptr);
      return false;
    }
    const bool input_fused = args.input != nullptr;
    // B = W_ih^T: element (k, col) = w_ih[col][k], in the GRU's three-vector panels.
    const PackedB w_ih =
        input_fused ? pack_b(static_cast<const float*>(args.w_ih), /*k_stride=*/1,
                             /*col_stride=*/features, features, 3 * hidden, ColumnOrder::kGates,
                             kGruGates, /*vecs=*/3)
                    : PackedB();
    const auto* input = static_cast<const float*>(args.input);
    const auto* h0 = static_cast<const float*>(args.h0);
    auto* gates = static_cast<float*>(args.gates);
    auto* output = static_cast<float*>(args.output);
    auto* hidden_n = static_cast<float*>(args.cells);
    const int64_t k_total = hidden + (input_fused ? features : 0);
    const int64_t threads =
        recurrence_threads(2 * batch * k_total * 3 * hidden, batch, w_hh.panels);
    HandOver hand_over(threads);
    run_on_threads(threads, [&](int64_t thread, int64_t team) {
      RecurrenceShare share = recurrence_share(batch, w_hh.panels, thread, team);
      StepSync sync(hand_over, share, w_hh.panels, thread, team, !splits_rows(batch, team));
      const int64_t r0 = share.row_begin, rows = share.rows();
      const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
      for (int64_t k = 0; k < args.steps; ++k) {
        const int64_t t = step_time(k, args.steps, args.reverse);
        const int64_t prev_t = step_time(k - 1, args.steps, args.reverse);
        const float* h_prev = (k == 0 ? h0 : output + prev_t * batch * hidden) + r0 * hidden;
        const int64_t first_row = t * batch + r0;  // of this share at step t
        const GruForwardOutput out{gates != nullptr ? gates + first_row * 3 * hidden : nullptr,
                                   static_cast<const float*>(args.bias_hn),
                                   h_prev,
                                   args.training ? hidden_n + first_row * hidden : nullptr,
                                   output + first_row * hidden,
                                   hidden,
                                   args.training,
                                   input_fused,
                                   static_cast<const float*>(args.bias),
                                   /*stream_saved=*/true};
        const float* x_t = input_fused ? input + first_row * features : nullptr;
        // Blocks of rows whose x_t and h_{t-1} rows stay in L2 while the panels pass over them.
        for (int64_t t0 = 0; t0 < row_tiles; t0 += kBlockTiles) {
          const int64_t t1 = std::min(row_tiles, t0 + kBlockTiles);
          for (int64_t p = share.panel_begin; p < share.panel_end; ++p) {
            for (int64_t tile = t0; tile < t1; ++tile) {
              const int64_t row0 = tile * kTileRows;
              const OperandA x_rows{x_t + row0 * features, features, 1};
              run_gru_tile(input_fused ? &x_rows : nullptr, &w_ih,
                           OperandA{h_prev + row0 * hidden, hidden, 1}, w_hh, out, row0,
                           std::min(kTileRows, rows - row0), p);
            }
          }
        }
        if (!sync.end_step(k)) {
          break;
        }
      }
      _mm_sfence();  // the saved activations' streaming stores (store_saved)
    });
    return true;
  }

  // The GRU's whole backward recurrence, as backward_recurrence; the GEMMs accumulate onto the
  // direct parts the epilogues leave in d_h.
  void gru_backward_recurrence(const BackwardRecurrenceArgs& args) {
    const int64_t batch = args.batch, hidden = args.hidden;
    const int64_t gate_stride = batch * 3 * hidden, state_stride = batch * hidden;
    const auto* gates = static_cast<const float*>(args.gates);
    const auto* hidden_n = static_cast<const float*>(args.cells);
    const auto* h0 = static_cast<const float*>(args.h0);
    const auto* output = static_cast<const float*>(args.output);
    const auto* d_output = static_cast<const float*>(args.d_output);
    auto* d_gates = static_cast<float*>(args.d_gates);
    auto* d_input_n = static_cast<float*>(args.d_input_n);
    run_backward_recurrence(args, 3 * hidden, /*accumulate=*/true,
                            [&](int64_t t, int64_t forward_k, int64_t r0, int64_t /*rows*/,
                                const PlainOutput& d_h_out) {
      const float* h_prev =
          (forward_k == 0 ? h0
                          : output + step_time(forward_k - 1, args.steps, args.reverse) * state_stride) +
          r0 * hidden;
      return GruBackwardOutput{d_h_out,
                               gates + t * gate_stride + r0 * 3 * hidden,
                               hidden_n + t * state_stride + r0 * hidden,
                               h_prev,
                               d_output + t * state_stride + r0 * hidden,
                               d_gates + t * gate_stride + r0 * 3 * hidden,
                               d_input_n + t * state_stride + r0 * hidden,
                               hidden};
    });
  }

  // The driver of a whole backward recurrence, for any cell: threads and their shares as in
  // backward_recurrence, the steps in backward order. make_output(t, forward_k, r0, rows, d_h_out)
  // gives step t's epilogue for the share starting at row r0; each step's recurrent GEMM (d_h from
  // the d_gates [rows, width] of the step processed before) ends in it, and a last GEMM gives
  // grad_h0. With `accumulate` the GEMMs add onto what the epilogues left in d_h (the GRU's and
  // zoneout's direct part of h_{t-1}'s gradient).
  template <typename MakeOutput>
  void run_backward_recurrence(const BackwardRecurrenceArgs& args, int64_t width, bool accumulate,
                               const MakeOutput& make_output) {
    const PackedB& b = packed_w_hh_;
    const int64_t batch = args.batch, hidden = args.hidden, steps = args.steps;
    const int64_t gate_stride = batch * width;
    const auto* d_gates = static_cast<const float*>(args.d_gates);
    auto* d_h = static_cast<float*>(args.d_h);
    const int64_t threads = recurrence_threads(2 * batch * b.k * b.cols, batch, b.panels);
    HandOver hand_over(threads);
    run_on_threads(threads, [&](int64_t thread, int64_t team) {
      RecurrenceShare share = recurrence_share(batch, b.panels, thread, team);
      StepSync sync(hand_over, share, b.panels, thread, team, !splits_rows(batch, team));
      const int64_t r0 = share.row_begin, rows = share.rows();
      // Every pointer below starts at the share's first row.
      const PlainOutput d_h_out{d_h + r0 * hidden, hidden, &b};
      int64_t later_t = -1;  // the step processed before this one (t + 1 in forward time order)
      for (int64_t k = 0; k < steps; ++k) {
        const int64_t forward_k = steps - 1 - k;
        const int64_t t = step_time(forward_k, steps, args.reverse);
        const auto out = make_output(t, forward_k, r0, rows, d_h_out);
        if (k == 0) {
          // The gradient reaching h_t from outside the sequence is grad_h_n, already in d_h.
          for (int64_t p = share.panel_begin; p < share.panel_end; ++p) {
            for (int64_t row = 0; row < rows; ++row) {
              RawVec acc[1][kPanelVecs];
              out.template load<1>(row, p, acc);
              out.template finish<1>(row, p, acc);
            }
          }
        } else {
          packed_gemm_panels(OperandA{d_gates + later_t * gate_stride + r0 * width, b.k, 1}, rows,
                             b, out, accumulate, share.panel_begin, share.panel_end);
        }
        later_t = t;
        if (!sync.end_step(k)) {
          return;  // the remaining steps and grad_h0 went to another thread
        }
      }
      // grad_h0: the gradient through the first step's recurrent GEMM (accumulated as above).
      packed_gemm_panels(OperandA{d_gates + later_t * gate_stride + r0 * width, b.k, 1}, rows, b,
                         d_h_out, accumulate, share.panel_begin, share.panel_end);
    });
  }

  const float* peephole_ptr() const {
    return peephole_.defined() ? peephole_.const_data_ptr<float>() : nullptr;
  }

  int64_t hidden_ = 0;
  PackedB packed_w_hh_;
  PackedB plain_w_hh_t_;  // the layer-norm step's W_hh^T, columns in plain order (lazily)
};

// The backend for a single step (T = 1: streaming, decoding, LSTMCell, GRUCell) of a few rows:
// the step's whole GEMM, bias + x W_ih^T + h W_hh^T, runs on the weights as they are stored
// (tile_multiply_rows), tile by tile into the cell's epilogue of the sequence backend. There is
// no packed copy to make, which at T = 1 would cost more than the GEMM, and no [N, G*H]
// pre-activations to write and read back. Everything else (larger batches, the backward pass)
// is ATen's, as for any single step.
class SingleStepFloatBackend final : public StepBackend {
 public:
  using StepBackend::StepBackend;

  // The largest batch run here. Each row tile after the first reads the panel's weights again,
  // from L2; past some batch ATen's GEMMs, which reuse each weight across more rows, win. Where
  // depends on ATen's GEMM (MKL) on the CPU at hand, measured at T = 1, 2 threads, paired in one
  // process:
  // - AVX-512 (Zen 4): up to 24 rows. C = H = 512: N = 20 698 us here against 1046 us on ATen's
  //   GEMMs; N = 32 (H = 256) and N = 64 1.4-1.7x slower here.
  // - AVX2 (Zen 3, where MKL reaches 45-70 GFLOP/s at these shapes): the LSTM up to 48 rows,
  //   H = 128-1024: N = 16-32 1.0-1.8x faster here, N = 48 1.0-1.6x, N = 64 0.97-1.09x and
  //   N = 128 0.82-1.17x; the GRU (fewer gates, so less work per weight read) up to 32:
  //   N = 16-32 0.94-1.68x, N = 48 0.90-1.16x.
  static constexpr int64_t kMaxLstmRows = kVecWidth == 16 ? 24 : 48;
  static constexpr int64_t kMaxGruRows = kVecWidth == 16 ? 24 : 32;

  bool fuses_input_projection(Cell cell, int64_t batch, int64_t features,
                              int64_t hidden) const override {
    const int64_t max_rows = cell == Cell::kGru ? kMaxGruRows : kMaxLstmRows;
    return batch > 0 && batch <= max_rows && features > 0 && hidden > 0;
  }

  bool forward_recurrence(const ForwardRecurrenceArgs& args) override {
    if (args.steps != 1 || args.input == nullptr ||
        !fuses_input_projection(args.cell, args.batch, args.features, args.hidden)) {
      return false;
    }
    if (args.cell == Cell::kGru) {
      gru_step(args);
      return true;
    }
    const int64_t cols = gate_count(args.cell) * args.hidden;
    const GateLayout gate_layout = recurrent_gate_layout(args.cell);
    const PackedB w_ih_layout = unpacked_gate_layout(args.features, cols, gate_layout);
    const PackedB w_hh_layout = unpacked_gate_layout(w_hh_.size(1), cols, gate_layout);
    const PlainOutput bias{nullptr, 0, &w_ih_layout, static_cast<const float*>(args.bias)};
    const ForwardStepView step = forward_step_view(args, /*k=*/0, /*r0=*/0, args.batch);
    run_step(args, w_ih_layout, w_hh_layout, step.h_prev, bias, step.out);
    return true;
  }

 private:
  // The GRU's step, as the LSTM's with the GRU's epilogue: r and z sum both products, while the n
  // gate's input half goes to vector 3 and its recurrent half to vector 2 (r multiplies only the
  // latter), as in the sequence backend's run_gru_tile. The epilogue also seeds the accumulators
  // (with the input projection's biases).
  void gru_step(const ForwardRecurrenceArgs& args) {
    const int64_t hidden = args.hidden;
    const PackedB w_ih_layout =
        unpacked_gate_layout(args.features, 3 * hidden, GateLayout{3, {0, 1, -1, 2}});
    const PackedB w_hh_layout = unpacked_gate_layout(hidden, 3 * hidden, kGruGates);
    const auto* h0 = static_cast<const float*>(args.h0);
    const GruForwardOutput out{static_cast<float*>(args.gates),
                               static_cast<const float*>(args.bias_hn),
                               h0,
                               args.training ? static_cast<float*>(args.cells) : nullptr,
                               static_cast<float*>(args.output),
                               hidden,
                               args.training,
                               /*input_fused=*/true,
                               static_cast<const float*>(args.bias),
                               /*stream_saved=*/true};
    run_step(args, w_ih_layout, w_hh_layout, h0, out, out);
  }

  // The step's tiles: panels (kVecWidth hidden units, every gate of each) over ATen's threads,
  // each panel's row tiles seeded by `seed`, multiplied by both weights (contiguous, as
  // forward_unchecked passes them: a row of W is K floats long) and finished by `out`.
  template <typename Seed, typename Output>
  void run_step(const ForwardRecurrenceArgs& args, const PackedB& w_ih_layout,
                const PackedB& w_hh_layout, const float* h_prev, const Seed& seed,
                const Output& out) const {
    const int64_t batch = args.batch, features = args.features, k_h = w_hh_layout.k;
    const auto* input = static_cast<const float*>(args.input);
    const auto* w_ih = static_cast<const float*>(args.w_ih);
    const float* w_hh = w_hh_.const_data_ptr<float>();  // contiguous (begin_forward's caller)
    // Panels per task: enough of the weights to be worth waking a thread for. Each panel's sums
    // are the same whoever runs it.
    constexpr int64_t kMinFlopsPerTask = 1 << 18;
    const int64_t panel_flops = 2 * batch * (features + k_h) * kPanelWidth;
    const int64_t grain = std::max<int64_t>(1, kMinFlopsPerTask / panel_flops);
    parallel_for_unless_busy(0, w_hh_layout.panels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        for (int64_t row0 = 0; row0 < batch; row0 += kTileRows) {
          run_tile(OperandA{input + row0 * features, features, 1}, w_ih, w_ih_layout,
                   OperandA{h_prev + row0 * k_h, k_h, 1}, w_hh, w_hh_layout, seed, out, row0,
                   std::min(kTileRows, batch - row0), p);
        }
      }
      // The saved activations' streaming stores, fenced on the thread that made them.
      _mm_sfence();
    });
  }

  template <typename Seed, typename Output, int64_t kRows = kTileRows>
  static void run_tile(const OperandA& x, const float* w_ih, const PackedB& w_ih_layout,
                       const OperandA& h, const float* w_hh, const PackedB& w_hh_layout,
                       const Seed& seed, const Output& out, int64_t row0, int64_t rows,
                       int64_t panel) {
    if constexpr (kRows > 1) {
      if (rows < kRows) {
        run_tile<Seed, Output, kRows - 1>(x, w_ih, w_ih_layout, h, w_hh, w_hh_layout, seed, out,
                                          row0, rows, panel);
        return;
      }
    }
    RawVec acc[kRows][kPanelVecs];
    seed.template init<kRows>(panel, acc);
    tile_multiply_rows<kRows>(x, w_ih, /*ld_w=*/w_ih_layout.k, w_ih_layout, panel, acc);
    tile_multiply_rows<kRows>(h, w_hh, /*ld_w=*/w_hh_layout.k, w_hh_layout, panel, acc);
    out.template finish<kRows>(row0, panel, acc);
  }
};

inline std::unique_ptr<StepBackend> make_single_step_float_backend(
    const PointwiseKernels& kernels) {
  return std::make_unique<SingleStepFloatBackend>(kernels);
}

inline std::unique_ptr<StepBackend> make_fused_float_backend(const PointwiseKernels& kernels) {
  return std::make_unique<FusedFloatBackend>(kernels);
}

}  // namespace CPU_CAPABILITY
}  // namespace lstm_ext::cpu
