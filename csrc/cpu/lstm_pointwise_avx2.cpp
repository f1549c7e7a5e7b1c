// The CPU pointwise passes for x86-64 CPUs with AVX2 and FMA: at::vec's AVX2 vectors, with Sleef's
// vectorized exp and tanh (exported by libtorch_cpu). The whole file is compiled for AVX2 + FMA via
// a target pragma (setuptools cannot give one source file its own flags); lstm_ops.cpp only calls
// into it after checking the running CPU supports both.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)

#pragma GCC target("avx,avx2,fma,f16c")
// g++ does not define the feature macros for a target pragma in C++; sleef.h declares its 256-bit
// functions only under __AVX__.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

#include "lstm_pointwise_impl.h"

namespace lstm_ext::cpu {

bool avx2_pointwise_kernels(PointwiseKernels* kernels) {
  *kernels = {&AVX2::forward_step, &AVX2::backward_step};
  return true;
}

}  // namespace lstm_ext::cpu

#else

#include "../common/lstm_sequence.h"

namespace lstm_ext::cpu {

bool avx2_pointwise_kernels(PointwiseKernels*) { return false; }

}  // namespace lstm_ext::cpu

#endif
