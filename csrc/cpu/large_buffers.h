// Large CPU buffers for the time loop (saved gates and cell states, gradients of the gates), from
// a cache of blocks that outlives each op call.
//
// Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
// mapping, and the first touch of each 4 KiB page of it then faults into the kernel, which zeroes
// the page. On the machines this project runs on, allocating and filling the 52 MB gate buffer of
// T=100, N=64, H=512 took 16 ms that way against 0.75 ms for a reused block: more than the whole
// gate math of a forward pass, twice per training step. Blocks here are 2 MiB aligned and marked
// for transparent huge pages (512 times fewer faults when fresh), and a block freed by its last
// tensor waits in the cache for the next call of about the same size, as PyTorch's CUDA caching
// allocator does. Blocks show up in torch.profiler's memory events like any CPU allocation.
//
// Buffers under kMinCachedBytes come from at::empty: glibc's heap reuses those without faults.
// The cache holds at most LSTM_EXT_CPU_CACHE_MB MiB of idle blocks (default 1024; 0 turns the
// cache off); lstm_ext.empty_cpu_cache() returns them to the system.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace lstm_ext::cpu {

constexpr int64_t kMinCachedBytes = int64_t{16} << 20;

// at::empty(sizes, options) for a CPU tensor, from the cache when it is large.
at::Tensor empty_large_buffer(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every idle cached block; returns how many bytes that released.
int64_t empty_large_buffer_cache();

}  // namespace lstm_ext::cpu
