// Programmatic dependent launch (sm_90+): a decode step is a chain of short kernels, each of which
// would otherwise start only after its predecessor has fully finished and flushed. A kernel launched
// with launch_dependent() may start early: it does its independent prologue (weights, tables,
// prefetches), then pdl_wait() holds it until every kernel before it in the stream has completed and
// its writes are visible. So nothing a predecessor writes may be read, and no global memory written,
// before pdl_wait(). pdl_launch_dependents() lets the next such kernel start while this one runs.
// Both are no-ops where the kernel was launched normally (and on other architectures).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#if !defined(JAXQUANT_HOST_HARNESS)
// JAXQUANT_PDL=0 launches every kernel after its predecessor has finished (as before PDL).
inline bool pdl_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("JAXQUANT_PDL");
    return !(e && e[0] == '0');
  }();
  return on;
}

// cudaLaunchKernelEx of a kernel that calls pdl_wait() before its dependent reads, with cfg's own
// attributes (a cluster shape, say) kept and programmatic stream serialization added.
template <class... P, class... A>
cudaError_t launch_dependent(void (*kernel)(P...), cudaLaunchConfig_t cfg, A&&... args) {
  cudaLaunchAttribute attrs[4];
  unsigned n = 0;
  for (; n < cfg.numAttrs && n < 3; ++n) attrs[n] = cfg.attrs[n];
  if (pdl_enabled()) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attrs;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}

// The plain form: grid, block, dynamic shared memory and stream, as <<<...>>> takes them.
template <class... P, class... A>
cudaError_t launch_dependent(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  return launch_dependent(kernel, cfg, std::forward<A>(args)...);
}
#endif
