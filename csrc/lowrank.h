/* lowrank native library: a torch-free C ABI, loaded from Python with ctypes.
 *
 * Every entry point returns a status code (LOWRANK_OK on success). Tensors are passed as raw
 * pointers plus sizes and strides in elements; dtypes as LOWRANK_DTYPE_* codes. The CUDA entry
 * points take the stream to launch on (torch.cuda.current_stream().cuda_stream).
 */
#ifndef LOWRANK_H_
#define LOWRANK_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LOWRANK_ABI_VERSION 1

enum lowrank_status {
  LOWRANK_OK = 0,
  LOWRANK_ERR_INVALID_ARGUMENT = 1,
  LOWRANK_ERR_UNSUPPORTED_DTYPE = 2,
  LOWRANK_ERR_CUDA = 3,
  LOWRANK_ERR_OUT_OF_MEMORY = 4,
  LOWRANK_ERR_CAPACITY = 5,
};

enum lowrank_dtype {
  LOWRANK_DTYPE_FLOAT32 = 0,
  LOWRANK_DTYPE_FLOAT16 = 1,
  LOWRANK_DTYPE_BFLOAT16 = 2,
};

/* ABI version of the library (LOWRANK_ABI_VERSION when it was built). */
int lowrank_cpu_abi_version(void);
/* A human-readable build description, e.g. "cpu g++ 12.2.0 openmp". Static storage. */
const char *lowrank_cpu_build_info(void);

int lowrank_cuda_abi_version(void);
/* e.g. "cuda 13.0 sm_80 sm_90". Static storage. */
const char *lowrank_cuda_build_info(void);
/* Human-readable message for the last CUDA error seen by this library on this thread. */
const char *lowrank_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* LOWRANK_H_ */
