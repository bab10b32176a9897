// Programmatic dependent launch (sm_90) for the chain of kernels of a quantized linear
// (input transform -> decode-matvec -> output transform, each one launch or more).
//
// Shared by both backends: harp_quip/quiptools/dependent_launch.cuh is the source of truth
// and harp_qtip/qtip-kernels/dependent_launch.cuh a byte copy (harp_qtip/tests/test_mirror.py).
// A kernel started by launch_dependent may run while its predecessor in the stream is still
// running: it calls allow_dependents() first (so that its own successor can be scheduled
// too), then reads what no kernel writes (weights, blocks, tables), and calls
// wait_for_predecessor() before it reads its input or writes any global memory. The
// launch latency and those weight loads then overlap the predecessor's tail. After a
// kernel launched the ordinary way (torch's), wait_for_predecessor() returns at once.
#pragma once

#include <cuda_runtime.h>

namespace harp_launch {

// Let the next kernel of the stream, if launched by launch_dependent, be scheduled now.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Block until the previous kernel of the stream has completed and its writes are visible.
__device__ __forceinline__ void wait_for_predecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// kernel<<<grid, threads, shared, stream>>>(args...) as a programmatic dependent launch,
// after allowing `shared` bytes of dynamic shared memory; 0 or the CUDA error.
// Every such kernel prefers the largest shared-memory carveout. An SM can only change its
// L1 / shared split when it is idle, so a successor that wanted another split than its
// predecessor's could not start on the predecessor's SMs early. Measured in the decode
// step (Llama-2-7B shape, H200, ms per step, had / harp): 5.95 / 6.39 without, 5.98 / 6.33
// with; for a matvec variant with 16 KB more shared memory, 5.88 / 6.80 without, 5.90 / 6.43
// with.
template <typename... Params, typename... Args>
int launch_dependent(void (*kernel)(Params...), dim3 grid, int threads, size_t shared,
                     cudaStream_t stream, Args... args) {
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(shared));
  if (error != cudaSuccess) return static_cast<int>(error);
  error = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                               cudaSharedmemCarveoutMaxShared);
  if (error != cudaSuccess) return static_cast<int>(error);
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  error = cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
  return static_cast<int>(error != cudaSuccess ? error : cudaGetLastError());
}

}  // namespace harp_launch
