// CUDA half of the lowrank native library. Built torch-free with nvcc --shared.
#include "lowrank.h"

#include <cuda_runtime.h>

#define LOWRANK_STR2(x) #x
#define LOWRANK_STR(x) LOWRANK_STR2(x)

#ifndef LOWRANK_CUDA_ARCHS
#define LOWRANK_CUDA_ARCHS "unknown"
#endif

static thread_local const char *g_last_error = "no error";

extern "C" int lowrank_cuda_abi_version(void) { return LOWRANK_ABI_VERSION; }

extern "C" const char *lowrank_cuda_build_info(void) {
  return "cuda " LOWRANK_STR(__CUDACC_VER_MAJOR__) "." LOWRANK_STR(__CUDACC_VER_MINOR__) " " LOWRANK_CUDA_ARCHS;
}

extern "C" const char *lowrank_cuda_last_error(void) { return g_last_error; }
