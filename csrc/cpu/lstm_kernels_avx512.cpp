// The CPU kernels for x86-64 CPUs with AVX-512 (F, BW, VL, DQ): as lstm_kernels_avx2.cpp, with
// 16-float vectors and the 32 vector registers that allow six-row GEMM tiles.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)

#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
// g++ does not define the feature macros for a target pragma in C++; sleef.h and at::vec test them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512

#include "fused_backend_impl.h"
#include "kernel_sets.h"

namespace lstm_ext::cpu {

bool avx512_kernel_set(CpuKernelSet* set) {
  set->name = "AVX512";
  set->pointwise = {&AVX512::forward_step, &AVX512::backward_step, &AVX512::gru_forward_step,
                   &AVX512::gru_backward_step};
  set->make_float_backend = &AVX512::make_fused_float_backend;
  set->make_single_step_float_backend = &AVX512::make_single_step_float_backend;
  return true;
}

}  // namespace lstm_ext::cpu

#else

#include "kernel_sets.h"

namespace lstm_ext::cpu {

bool avx512_kernel_set(CpuKernelSet*) { return false; }

}  // namespace lstm_ext::cpu

#endif
