// CUDA half of the lowrank native library. Built torch-free with nvcc --shared.
#include "lowrank.h"

#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "merge_math.h"

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

// ---- merge / unmerge ------------------------------------------------------------------------
// A block owns a tile of TM x TN elements of W; each thread owns RPT rows x VEC consecutive
// columns, so W moves in 16-byte loads and stores (8 x 16-bit or 2 x 4 x fp32). The rank loop
// runs in chunks of KC: the chunk's rows of A (KC x TN) and columns of B (TM x KC) are staged in
// shared memory as fp32, and every thread keeps its RPT x VEC accumulators in registers. The
// epilogue is merge_math.h's, element for element the same as the CPU library's; records are
// gathered with one atomicAdd per warp and element slot (ballot + popc).
using namespace lowrank;

namespace {

constexpr int VEC = 8;
constexpr int TX = 32;               // threads along columns
constexpr int TY = 8;                // threads along rows
constexpr int RPT = 4;               // rows per thread
constexpr int TN = TX * VEC;         // 256 columns per block
constexpr int TM = TY * RPT;         // 32 rows per block
constexpr int KC = 16;               // rank chunk staged in shared memory

template <int DT>
__device__ __forceinline__ float to_float(uint32_t bits) {
  if (DT == DT_F32) return u2f(bits);
  if (DT == DT_F16) return half_to_float(bits);
  return bf16_to_float(bits);
}

template <int DT>
__device__ __forceinline__ uint32_t fast_round(float v) {
  if (DT == DT_F32) return f2u(v);
  if (DT == DT_F16) return float_to_half_normal(v);
  return float_to_bf16_normal(v);
}

template <int DT>
__device__ __forceinline__ int32_t certified(float v, float e) {
  if (DT == DT_F32) return 1;
  if (DT == DT_F16) return certified_half(v, e);
  return certified_bf16(v, e);
}

struct Params {
  void *w;
  int64_t rows, cols, ldw;
  const float *b, *a;
  int rank;
  const float *rb, *cb;
  float abs_bound;
  double scale;
  int32_t *rec_idx;
  void *rec_val;
  int64_t cap;
  unsigned long long *count;
};

template <int DT>
__device__ uint32_t slow(const Params &p, int64_t i, int64_t j, uint32_t wbits, bool *fails) {
  double acc = 0.0;
  for (int k = 0; k < p.rank; ++k)
    acc = __dadd_rn(acc, __dmul_rn((double)p.b[i * p.rank + k], (double)p.a[(int64_t)k * p.cols + j]));
  uint32_t y = slow_element<DT>(wbits, p.scale, acc);
  if (fails) *fails = slow_element<DT>(y, -p.scale, acc) != wbits;
  return y;
}

template <int DT, bool RECORD>
__global__ void __launch_bounds__(TX * TY) merge_kernel(Params p, bool vec_ok) {
  using T = typename Store<DT>::T;
  __shared__ float sA[KC][TN];
  __shared__ float sB[TM][KC + 1];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * TX + tx;
  const int64_t row0 = (int64_t)blockIdx.y * TM, col0 = (int64_t)blockIdx.x * TN;
  const int64_t jb = col0 + tx * VEC;  // this thread's first column
  float acc[RPT][VEC];
#pragma unroll
  for (int q = 0; q < RPT; ++q)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[q][v] = 0.0f;

  for (int k0 = 0; k0 < p.rank; k0 += KC) {
    for (int e = tid; e < KC * TN; e += TX * TY) {
      const int kk = e / TN, jj = e % TN;
      const int64_t j = col0 + jj;
      sA[kk][jj] = (k0 + kk < p.rank && j < p.cols) ? p.a[(int64_t)(k0 + kk) * p.cols + j] : 0.0f;
    }
    for (int e = tid; e < TM * KC; e += TX * TY) {
      const int ii = e / KC, kk = e % KC;
      const int64_t i = row0 + ii;
      sB[ii][kk] = (k0 + kk < p.rank && i < p.rows) ? p.b[i * p.rank + k0 + kk] : 0.0f;
    }
    __syncthreads();
    const int kn = min(KC, p.rank - k0);
    for (int kk = 0; kk < kn; ++kk) {
      float av[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) av[v] = sA[kk][tx * VEC + v];
#pragma unroll
      for (int q = 0; q < RPT; ++q) {
        const float bq = sB[ty + q * TY][kk];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[q][v] = fmaf(bq, av[v], acc[q][v]);
      }
    }
    __syncthreads();
  }

  const float s32 = (float)p.scale;
  const unsigned lane = tid & 31u;
#pragma unroll
  for (int q = 0; q < RPT; ++q) {
    const int64_t i = row0 + ty + q * TY;
    const bool row_in = i < p.rows;
    T *wrow = (T *)p.w + (row_in ? i : 0) * p.ldw;
    uint32_t wb[VEC];
    const bool full = row_in && vec_ok && jb + VEC <= p.cols;
    if (full) {
      if (sizeof(T) == 2) {
        uint4 raw = *(const uint4 *)(wrow + jb);
        const uint32_t r4[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          wb[2 * v] = r4[v] & 0xFFFFu;
          wb[2 * v + 1] = r4[v] >> 16;
        }
      } else {
        uint4 r0 = *(const uint4 *)(wrow + jb), r1 = *(const uint4 *)(wrow + jb + 4);
        wb[0] = r0.x; wb[1] = r0.y; wb[2] = r0.z; wb[3] = r0.w;
        wb[4] = r1.x; wb[5] = r1.y; wb[6] = r1.z; wb[7] = r1.w;
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) wb[v] = (row_in && jb + v < p.cols) ? (uint32_t)wrow[jb + v] : 0u;
    }
    const float rbi = row_in ? p.rb[i] : 0.0f;
    uint32_t y[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const int64_t j = jb + v;
      const bool in = row_in && j < p.cols;
      const float cbj = in ? p.cb[j] : 0.0f;
      const float vv = fmaf(s32, acc[q][v], to_float<DT>(wb[v]));
      y[v] = fast_round<DT>(vv);
      bool rec = false, slow_path = false;
      if (DT == DT_F32) {
        if (RECORD) rec = f2u(fmaf(-s32, acc[q][v], vv)) != wb[v];
      } else {
        bool ok = certified<DT>(vv, error_bound(rbi, cbj, vv, p.abs_bound));
        if (RECORD) {
          const float v2 = fmaf(-s32, acc[q][v], to_float<DT>(y[v]));
          ok = ok && certified<DT>(v2, error_bound(rbi, cbj, v2, p.abs_bound));
          rec = fast_round<DT>(v2) != wb[v];
        }
        slow_path = !ok;
      }
      if (in && slow_path) y[v] = slow<DT>(p, i, j, wb[v], RECORD ? &rec : nullptr);
      if (RECORD) {
        rec = rec && in;
        const unsigned mask = __ballot_sync(0xFFFFFFFFu, rec);
        if (mask) {
          unsigned long long base = 0;
          const int leader = __ffs(mask) - 1;
          if ((int)lane == leader) base = atomicAdd(p.count, (unsigned long long)__popc(mask));
          base = __shfl_sync(0xFFFFFFFFu, base, leader);
          if (rec) {
            const unsigned long long slot = base + __popc(mask & ((1u << lane) - 1u));
            if ((long long)slot < p.cap) {
              p.rec_idx[slot] = (int32_t)(i * p.cols + j);
              ((T *)p.rec_val)[slot] = (T)wb[v];
            }
          }
        }
      }
    }
    if (full) {
      if (sizeof(T) == 2) {
        uint4 raw;
        raw.x = y[0] | (y[1] << 16);
        raw.y = y[2] | (y[3] << 16);
        raw.z = y[4] | (y[5] << 16);
        raw.w = y[6] | (y[7] << 16);
        *(uint4 *)(wrow + jb) = raw;
      } else {
        *(uint4 *)(wrow + jb) = make_uint4(y[0], y[1], y[2], y[3]);
        *(uint4 *)(wrow + jb + 4) = make_uint4(y[4], y[5], y[6], y[7]);
      }
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        if (row_in && jb + v < p.cols) wrow[jb + v] = (T)y[v];
    }
  }
}

template <typename T>
__global__ void restore_kernel(T *w, int64_t cols, int64_t ldw, const int32_t *idx, const T *val,
                               int64_t count) {
  const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (n < count) w[(idx[n] / cols) * ldw + idx[n] % cols] = val[n];
}

int fail(cudaError_t err) {
  g_last_error = cudaGetErrorString(err);
  return err == cudaErrorMemoryAllocation ? LOWRANK_ERR_OUT_OF_MEMORY : LOWRANK_ERR_CUDA;
}

template <int DT>
int launch(const Params &p, cudaStream_t stream) {
  using T = typename Store<DT>::T;
  const bool vec_ok = ((uintptr_t)p.w % 16 == 0) && ((p.ldw * (int64_t)sizeof(T)) % 16 == 0);
  const int64_t gy = (p.rows + TM - 1) / TM;
  if (gy > 65535) return LOWRANK_ERR_INVALID_ARGUMENT;
  dim3 grid((unsigned)((p.cols + TN - 1) / TN), (unsigned)gy), block(TX, TY);
  if (p.rec_idx)
    merge_kernel<DT, true><<<grid, block, 0, stream>>>(p, vec_ok);
  else
    merge_kernel<DT, false><<<grid, block, 0, stream>>>(p, vec_ok);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? LOWRANK_OK : fail(err);
}

}  // namespace

extern "C" int lowrank_cuda_merge(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                                  const float *b, const float *a, int64_t rank,
                                  const float *row_bound, const float *col_bound, float abs_bound,
                                  double scale, int32_t *rec_idx, void *rec_val,
                                  int64_t rec_capacity, int64_t *rec_count, void *stream) {
  if (rows < 0 || cols < 0 || rank < 1 || rank > 256 || ldw < cols) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (rows == 0 || cols == 0) return LOWRANK_OK;
  if (!w || !b || !a || !row_bound || !col_bound || !(abs_bound >= 0.0f) || !isfinite(scale))
    return LOWRANK_ERR_INVALID_ARGUMENT;
  if (rec_idx && (!rec_val || !rec_count || rec_capacity < 0 || rows * cols > INT32_MAX))
    return LOWRANK_ERR_INVALID_ARGUMENT;
  Params p{w, rows, cols, ldw, b, a, (int)rank, row_bound, col_bound, abs_bound, scale,
           rec_idx, rec_val, rec_capacity, (unsigned long long *)rec_count};
  cudaStream_t s = (cudaStream_t)stream;
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32: return launch<DT_F32>(p, s);
    case LOWRANK_DTYPE_FLOAT16: return launch<DT_F16>(p, s);
    case LOWRANK_DTYPE_BFLOAT16: return launch<DT_BF16>(p, s);
    default: return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  }
}

extern "C" int lowrank_cuda_restore(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                                    const int32_t *rec_idx, const void *rec_val, int64_t count,
                                    void *stream) {
  if (count == 0) return LOWRANK_OK;
  if (!w || !rec_idx || !rec_val || count < 0 || rows < 0 || cols <= 0 || ldw < cols)
    return LOWRANK_ERR_INVALID_ARGUMENT;
  cudaStream_t s = (cudaStream_t)stream;
  const unsigned blocks = (unsigned)((count + 255) / 256);
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32:
      restore_kernel<<<blocks, 256, 0, s>>>((uint32_t *)w, cols, ldw, rec_idx, (const uint32_t *)rec_val, count);
      break;
    case LOWRANK_DTYPE_FLOAT16:
    case LOWRANK_DTYPE_BFLOAT16:
      restore_kernel<<<blocks, 256, 0, s>>>((uint16_t *)w, cols, ldw, rec_idx, (const uint16_t *)rec_val, count);
      break;
    default: return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  }
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? LOWRANK_OK : fail(err);
}

// ---- DoRA merge / unmerge -------------------------------------------------------------------
// One thread per element, in storage order (coalesced on W); the float64 arithmetic of
// merge_math.h's dora_*_element with explicit round-to-nearest intrinsics (no fma contraction), so
// the same bits as the CPU library and the pure-torch path. The merge runs a checking pass first
// (overflow: the smallest flat index by atomicMin; the record: slots by atomicAdd), reads its
// verdict on the host, and writes W in a second pass only when both checks pass.
namespace {

struct DoraParams {
  void *w;
  int64_t rows, cols, ld;  // logical rows x cols; ld: the stride of the non-unit dimension
  bool trans;              // W[i, j] at j * ld + i (a transposed view) instead of i * ld + j
  const double *b, *a;
  int64_t rank;
  double s;
  const double *scale, *inv;
  int32_t *rec_idx;
  void *rec_val;
  int64_t cap;
  unsigned long long *count, *bad;
};

enum { DORA_CHECK = 0, DORA_WRITE = 1, DORA_UNMERGE = 2 };

template <int DT, int MODE, bool RECORD>
__global__ void dora_kernel(DoraParams p) {
  using T = typename Store<DT>::T;
  const int64_t total = p.rows * p.cols;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = p.trans ? e % p.rows : e / p.cols;
    const int64_t j = p.trans ? e / p.rows : e % p.cols;
    T *at = (T *)p.w + (p.trans ? j * p.ld + i : i * p.ld + j);
    double acc = 0.0;
    for (int64_t t = 0; t < p.rank; ++t) acc = __dadd_rn(acc, __dmul_rn(p.b[i * p.rank + t], p.a[t * p.cols + j]));
    const uint32_t wb = *at;
    if (MODE == DORA_UNMERGE) {
      *at = (T)dora_unmerge_element<DT>(wb, acc, p.s, p.inv[i]);
      continue;
    }
    const uint32_t y = dora_merge_element<DT>(wb, acc, p.s, p.scale[i]);
    if (MODE == DORA_WRITE) {
      *at = (T)y;
      continue;
    }
    const unsigned long long idx = (unsigned long long)(i * p.cols + j);
    if (storage_nonfinite<DT>(y) && !storage_nonfinite<DT>(wb)) atomicMin(p.bad, idx);
    if (RECORD && dora_unmerge_element<DT>(y, acc, p.s, p.inv[i]) != wb) {
      const unsigned long long slot = atomicAdd(p.count, 1ull);
      if ((long long)slot < p.cap) {
        p.rec_idx[slot] = (int32_t)idx;
        ((T *)p.rec_val)[slot] = (T)wb;
      }
    }
  }
}

template <typename T>
__global__ void dora_restore_kernel(T *w, int64_t cols, int64_t ld, bool trans, const int32_t *idx, const T *val,
                                    int64_t count) {
  const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (n < count) {
    const int64_t i = idx[n] / cols, j = idx[n] % cols;
    w[trans ? j * ld + i : i * ld + j] = val[n];
  }
}

unsigned dora_blocks(int64_t total) { return (unsigned)std::min<int64_t>((total + 255) / 256, 65535 * 16); }

template <int DT, int MODE>
void dora_launch(const DoraParams &p, cudaStream_t stream) {
  const unsigned blocks = dora_blocks(p.rows * p.cols);
  if (MODE == DORA_CHECK && p.rec_idx)
    dora_kernel<DT, MODE, true><<<blocks, 256, 0, stream>>>(p);
  else
    dora_kernel<DT, MODE, false><<<blocks, 256, 0, stream>>>(p);
}

template <int DT>
int dora_merge_cuda(DoraParams p, int64_t *rec_count, int64_t *bad_index, cudaStream_t stream) {
  unsigned long long *scratch = nullptr;  // [count, bad]
  cudaError_t err = cudaMallocAsync((void **)&scratch, 2 * sizeof(unsigned long long), stream);
  if (err != cudaSuccess) return fail(err);
  unsigned long long host[2] = {0ull, ~0ull};
  cudaMemcpyAsync(scratch, host, sizeof(host), cudaMemcpyHostToDevice, stream);
  p.count = scratch;
  p.bad = scratch + 1;
  dora_launch<DT, DORA_CHECK>(p, stream);
  cudaMemcpyAsync(host, scratch, sizeof(host), cudaMemcpyDeviceToHost, stream);
  cudaFreeAsync(scratch, stream);
  err = cudaStreamSynchronize(stream);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) return fail(err);
  if (host[1] != ~0ull) {
    if (bad_index) *bad_index = (int64_t)host[1];
    return LOWRANK_ERR_OVERFLOW;
  }
  if (p.rec_idx) {
    *rec_count = (int64_t)host[0];
    if ((int64_t)host[0] > p.cap) return LOWRANK_ERR_CAPACITY;
  }
  dora_launch<DT, DORA_WRITE>(p, stream);
  err = cudaStreamSynchronize(stream);
  if (err == cudaSuccess) err = cudaGetLastError();
  return err == cudaSuccess ? LOWRANK_OK : fail(err);
}

// The layout checks of lowrank_cpu_dora_merge: rows contiguous (ws1 == 1) or a transposed view (ws0 == 1).
int dora_layout(int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, bool *trans, int64_t *ld) {
  if (ws1 == 1 && (rows <= 1 || ws0 >= cols)) {
    *trans = false;
    *ld = ws0;
    return LOWRANK_OK;
  }
  if (ws0 == 1 && (cols <= 1 || ws1 >= rows)) {
    *trans = true;
    *ld = ws1;
    return LOWRANK_OK;
  }
  return LOWRANK_ERR_INVALID_ARGUMENT;
}

}  // namespace

extern "C" int lowrank_cuda_dora_merge(void *w, int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, int dtype,
                                       const double *b, const double *a, int64_t rank, double s,
                                       const double *scale, const double *inv, int32_t *rec_idx, void *rec_val,
                                       int64_t rec_capacity, int64_t *rec_count, int64_t *bad_index, void *stream) {
  if (dtype < LOWRANK_DTYPE_FLOAT32 || dtype > LOWRANK_DTYPE_BFLOAT16) return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  if (rows < 0 || cols < 0) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (rows == 0 || cols == 0) {
    if (rec_count) *rec_count = 0;
    return LOWRANK_OK;
  }
  if (rank < 1 || !w || !b || !a || !scale || !inv || !isfinite(s)) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (rec_idx && (!rec_val || !rec_count || rec_capacity < 0 || rows * cols > INT32_MAX))
    return LOWRANK_ERR_INVALID_ARGUMENT;
  bool trans;
  int64_t ld;
  if (dora_layout(rows, cols, ws0, ws1, &trans, &ld) != LOWRANK_OK) return LOWRANK_ERR_INVALID_ARGUMENT;
  DoraParams p{w, rows, cols, ld, trans, b, a, rank, s, scale, inv, rec_idx, rec_val, rec_capacity, nullptr, nullptr};
  cudaStream_t st = (cudaStream_t)stream;
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32: return dora_merge_cuda<DT_F32>(p, rec_count, bad_index, st);
    case LOWRANK_DTYPE_FLOAT16: return dora_merge_cuda<DT_F16>(p, rec_count, bad_index, st);
    default: return dora_merge_cuda<DT_BF16>(p, rec_count, bad_index, st);
  }
}

extern "C" int lowrank_cuda_dora_unmerge(void *w, int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, int dtype,
                                         const double *b, const double *a, int64_t rank, double s, const double *inv,
                                         const int32_t *rec_idx, const void *rec_val, int64_t count, void *stream) {
  if (dtype < LOWRANK_DTYPE_FLOAT32 || dtype > LOWRANK_DTYPE_BFLOAT16) return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  if (rows < 0 || cols < 0 || count < 0 || (count > 0 && (!rec_idx || !rec_val))) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (rows == 0 || cols == 0) return count == 0 ? LOWRANK_OK : LOWRANK_ERR_INVALID_ARGUMENT;
  if (rank < 1 || !w || !b || !a || !inv || !isfinite(s)) return LOWRANK_ERR_INVALID_ARGUMENT;
  bool trans;
  int64_t ld;
  if (dora_layout(rows, cols, ws0, ws1, &trans, &ld) != LOWRANK_OK) return LOWRANK_ERR_INVALID_ARGUMENT;
  DoraParams p{w, rows, cols, ld, trans, b, a, rank, s, nullptr, inv, nullptr, nullptr, 0, nullptr, nullptr};
  cudaStream_t st = (cudaStream_t)stream;
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32: dora_launch<DT_F32, DORA_UNMERGE>(p, st); break;
    case LOWRANK_DTYPE_FLOAT16: dora_launch<DT_F16, DORA_UNMERGE>(p, st); break;
    default: dora_launch<DT_BF16, DORA_UNMERGE>(p, st); break;
  }
  if (count > 0) {  // the caller checked the indices (lowrank/ops/dora_merge.py): in 0 .. rows * cols - 1
    const unsigned blocks = (unsigned)((count + 255) / 256);
    if (dtype == LOWRANK_DTYPE_FLOAT32)
      dora_restore_kernel<<<blocks, 256, 0, st>>>((uint32_t *)w, cols, ld, trans, rec_idx, (const uint32_t *)rec_val,
                                                  count);
    else
      dora_restore_kernel<<<blocks, 256, 0, st>>>((uint16_t *)w, cols, ld, trans, rec_idx, (const uint16_t *)rec_val,
                                                  count);
  }
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? LOWRANK_OK : fail(err);
}
