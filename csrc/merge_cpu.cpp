// CPU half of the lowrank native library (OpenMP).
#include "lowrank.h"

#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <new>
#include <vector>

#include "merge_math.h"

#define LOWRANK_STR2(x) #x
#define LOWRANK_STR(x) LOWRANK_STR2(x)

extern "C" int lowrank_cpu_abi_version(void) { return LOWRANK_ABI_VERSION; }

extern "C" const char *lowrank_cpu_build_info(void) {
  return "cpu g++ " __VERSION__
#ifdef _OPENMP
         " openmp " LOWRANK_STR(_OPENMP)
#endif
      ;
}

// ---- merge / unmerge ------------------------------------------------------------------------
// Work is split into tasks of (RB rows x JT columns); OpenMP's static schedule hands each thread
// one contiguous run of tasks, so concatenating the threads' records in thread order gives them
// sorted by index (deterministic). Inside a task the rank loop updates RB rows of accumulators
// from one load of A's row (the inner j loops vectorize), then a branch-free epilogue certifies
// and rounds every element; the rare uncertified ones are redone in double afterwards.

using namespace lowrank;

namespace {

// One build runs well everywhere: AVX-512 and AVX2+FMA clones chosen at load time by CPU
// features (GCC ifunc). "arch=haswell"-style clones dispatch on the CPU *model* and fell back to
// the no-FMA default on AMD EPYC (fmaf became a libm call: 25x slower).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOWRANK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#else
#define LOWRANK_CLONES __attribute__((noinline))
#endif

constexpr int RB = 4;    // rows per task: each load of A[k, j] feeds RB fmas
constexpr int JT = 256;  // columns per task: RB x JT fp32 accumulators = 4 KiB, in L1

struct Rec {
  int32_t idx;
  uint32_t bits;
};

template <int DT>
struct Store;
template <>
struct Store<DT_F32> {
  using T = uint32_t;
};
template <>
struct Store<DT_F16> {
  using T = uint16_t;
};
template <>
struct Store<DT_BF16> {
  using T = uint16_t;
};

template <int DT>
static inline float to_float(uint32_t bits) {
  if (DT == DT_F32) return u2f(bits);
  if (DT == DT_F16) return half_to_float(bits);
  return bf16_to_float(bits);
}

template <int DT>
static inline uint32_t fast_round(float v) {
  if (DT == DT_F32) return f2u(v);
  if (DT == DT_F16) return float_to_half_normal(v);
  return float_to_bf16_normal(v);
}

template <int DT>
static inline int32_t certified(float v, float e) {
  if (DT == DT_F32) return 1;
  if (DT == DT_F16) return certified_half(v, e);
  return certified_bf16(v, e);
}

struct Args {
  void *w;
  int64_t rows, cols, ldw;
  const float *b, *a;
  const float *at;  // a transposed (cols x rank) for the slow path, or null
  int64_t rank;
  const float *rb, *cb;
  float abs_bound;
  double scale;
  bool record;
};

// Double-precision redo of element (i, j); also its round trip when recording.
template <int DT>
static uint32_t slow(const Args &g, int64_t i, int64_t j, uint32_t wbits, bool *fails) {
  double acc = 0.0;
  const float *bi = g.b + i * g.rank;
  if (g.at) {  // contiguous: the strided column of a costs a cache miss per k (2x at r = 64, fp16)
    const float *aj = g.at + j * g.rank;
    for (int64_t k = 0; k < g.rank; ++k) acc += (double)bi[k] * (double)aj[k];
  } else {
    for (int64_t k = 0; k < g.rank; ++k) acc += (double)bi[k] * (double)g.a[k * g.cols + j];
  }
  uint32_t y = slow_element<DT>(wbits, g.scale, acc);
  if (fails) *fails = slow_element<DT>(y, -g.scale, acc) != wbits;
  return y;
}

// One tile: rows [i0, i0 + nr), columns [j0, j0 + nc). Appends row i0 + q's records to out[q].
// The epilogue works on 32-bit arrays (widen W, compute, narrow back) under `omp simd`: with the
// 16-bit loads and stores inside the same loop GCC 12 left it scalar (4x slower at 4096^2 bf16).
template <int DT, bool RECORD>
LOWRANK_CLONES
void merge_tile(const Args &g, int64_t i0, int nr, int64_t j0, int nc, std::vector<Rec> *out) {
  using T = typename Store<DT>::T;
  alignas(64) float acc[RB][JT];
  alignas(64) uint32_t wb[JT], yb[JT];
  alignas(64) int32_t flag[JT];  // bit 0: needs a record, bit 1: needs the slow path
  const float s32 = (float)g.scale;
  const int64_t r = g.rank;
  for (int q = 0; q < RB; ++q)
    for (int j = 0; j < JT; ++j) acc[q][j] = 0.0f;
  if (nr == RB) {
    const float *b0 = g.b + i0 * r;
    float *acc0 = acc[0], *acc1 = acc[1], *acc2 = acc[2], *acc3 = acc[3];
    for (int64_t k = 0; k < r; ++k) {
      const float *ak = g.a + k * g.cols + j0;
      const float c0 = b0[k], c1 = b0[r + k], c2 = b0[2 * r + k], c3 = b0[3 * r + k];
#pragma omp simd aligned(acc0, acc1, acc2, acc3 : 64)
      for (int j = 0; j < nc; ++j) {
        const float x = ak[j];
        acc0[j] = fmaf(c0, x, acc0[j]);
        acc1[j] = fmaf(c1, x, acc1[j]);
        acc2[j] = fmaf(c2, x, acc2[j]);
        acc3[j] = fmaf(c3, x, acc3[j]);
      }
    }
  } else {
    for (int q = 0; q < nr; ++q) {
      const float *bq = g.b + (i0 + q) * r;
      float *accq = acc[q];
      for (int64_t k = 0; k < r; ++k) {
        const float *ak = g.a + k * g.cols + j0;
        const float c = bq[k];
#pragma omp simd
        for (int j = 0; j < nc; ++j) accq[j] = fmaf(c, ak[j], accq[j]);
      }
    }
  }
  for (int q = 0; q < nr; ++q) {
    const int64_t i = i0 + q;
    T *wrow = (T *)g.w + i * g.ldw + j0;
    const float rbi = g.rb[i];
    const float *cbj = g.cb + j0;
    const float *accq = acc[q];
    const float abs_bound = g.abs_bound;
    for (int j = 0; j < nc; ++j) wb[j] = wrow[j];
    int32_t any = 0;
#pragma omp simd reduction(| : any)
    for (int j = 0; j < nc; ++j) {
      const float v = fmaf(s32, accq[j], to_float<DT>(wb[j]));
      const uint32_t y = fast_round<DT>(v);
      int32_t f = 0;
      if (DT == DT_F32) {
        if (RECORD) f = (int32_t)(f2u(fmaf(-s32, accq[j], v)) != wb[j]);
      } else {
        const int32_t ok1 = certified<DT>(v, error_bound(rbi, cbj[j], v, abs_bound));
        if (RECORD) {
          const float v2 = fmaf(-s32, accq[j], to_float<DT>(y));
          const int32_t ok2 = certified<DT>(v2, error_bound(rbi, cbj[j], v2, abs_bound));
          f = (int32_t)(fast_round<DT>(v2) != wb[j]) | ((1 - (ok1 & ok2)) << 1);
        } else {
          f = (1 - ok1) << 1;
        }
      }
      yb[j] = y;
      flag[j] = f;
      any |= f;
    }
    if (any & 2) {  // rare (~0.2% of elements): redo in double
      for (int j = 0; j < nc; ++j) {
        if (!(flag[j] & 2)) continue;
        bool fails = false;
        yb[j] = slow<DT>(g, i, j0 + j, wb[j], RECORD ? &fails : nullptr);
        flag[j] = (int32_t)fails;
        any |= flag[j];
      }
    }
    for (int j = 0; j < nc; ++j) wrow[j] = (T)yb[j];
    if (RECORD && (any & 1)) {
      // Branch-free compaction: records hit ~5-10% of elements at random, where an `if` would
      // mispredict on most of them.
      Rec tmp[JT];
      const int32_t base = (int32_t)(i * g.cols + j0);
      int cnt = 0;
      for (int j = 0; j < nc; ++j) {
        tmp[cnt] = Rec{base + j, wb[j]};
        cnt += flag[j] & 1;
      }
      out[q].insert(out[q].end(), tmp, tmp + cnt);
    }
  }
}

template <int DT>
static int merge_impl(const Args &g, int32_t *rec_idx, void *rec_val, int64_t cap, int64_t *count) {
  using T = typename Store<DT>::T;
  // A task is a block of RB rows over all columns, so that each thread's records, appended row
  // by row, come out sorted by flat index.
  const int64_t tasks = (g.rows + RB - 1) / RB;
  int nthreads = omp_get_max_threads();
  std::vector<std::vector<Rec>> recs(g.record ? nthreads : 0);
  bool oom = false;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<Rec> *mine = g.record ? &recs[omp_get_thread_num()] : nullptr;
    std::vector<Rec> rows_out[RB];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t i0 = t * RB;
      const int nr = (int)std::min<int64_t>(RB, g.rows - i0);
      try {
        for (int64_t j0 = 0; j0 < g.cols; j0 += JT) {
          const int nc = (int)std::min<int64_t>(JT, g.cols - j0);
          if (g.record)
            merge_tile<DT, true>(g, i0, nr, j0, nc, rows_out);
          else
            merge_tile<DT, false>(g, i0, nr, j0, nc, rows_out);
        }
        if (mine) {
          for (int q = 0; q < nr; ++q) {
            mine->insert(mine->end(), rows_out[q].begin(), rows_out[q].end());
            rows_out[q].clear();
          }
        }
      } catch (const std::bad_alloc &) {
#pragma omp atomic write
        oom = true;
      }
    }
  }
  if (!g.record) return oom ? LOWRANK_ERR_OUT_OF_MEMORY : LOWRANK_OK;
  int64_t total = 0;
  for (auto &v : recs) total += (int64_t)v.size();
  *count = total;
  if (oom || total > cap) {
    // Undo: the unmerge restores every element not in the record by construction, and the
    // record (complete here, only too large for the caller's buffer) restores the rest.
    Args back = g;
    back.scale = -g.scale;
    back.record = false;
    merge_impl<DT>(back, nullptr, nullptr, 0, nullptr);
    for (auto &v : recs)
      for (const Rec &rc : v) ((T *)g.w)[(rc.idx / g.cols) * g.ldw + rc.idx % g.cols] = (T)rc.bits;
    return oom ? LOWRANK_ERR_OUT_OF_MEMORY : LOWRANK_ERR_CAPACITY;
  }
  int64_t n = 0;
  for (auto &v : recs) {
    for (const Rec &rc : v) {
      rec_idx[n] = rc.idx;
      ((T *)rec_val)[n] = (T)rc.bits;
      ++n;
    }
  }
  return LOWRANK_OK;
}

}  // namespace

static int merge_dispatch(const Args &g, int dtype, int32_t *rec_idx, void *rec_val, int64_t rec_capacity,
                          int64_t *rec_count);

extern "C" int lowrank_cpu_merge(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                                 const float *b, const float *a, int64_t rank,
                                 const float *row_bound, const float *col_bound, float abs_bound,
                                 double scale, int32_t *rec_idx, void *rec_val,
                                 int64_t rec_capacity, int64_t *rec_count) {
  if (rows < 0 || cols < 0 || rank < 1 || rank > 256 || ldw < cols) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (rows == 0 || cols == 0) {
    if (rec_count) *rec_count = 0;
    return LOWRANK_OK;
  }
  if (!w || !b || !a || !row_bound || !col_bound || !(abs_bound >= 0.0f) || !isfinite(scale))
    return LOWRANK_ERR_INVALID_ARGUMENT;
  const bool record = rec_idx != nullptr;
  if (record && (!rec_val || !rec_count || rec_capacity < 0 || rows * cols > INT32_MAX))
    return LOWRANK_ERR_INVALID_ARGUMENT;
  Args g{w, rows, cols, ldw, b, a, nullptr, rank, row_bound, col_bound, abs_bound, scale, record};
  return merge_dispatch(g, dtype, rec_idx, rec_val, rec_capacity, rec_count);
}

static int merge_dispatch(const Args &g, int dtype, int32_t *rec_idx, void *rec_val, int64_t rec_capacity,
                          int64_t *rec_count) {
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32: return merge_impl<DT_F32>(g, rec_idx, rec_val, rec_capacity, rec_count);
    case LOWRANK_DTYPE_FLOAT16: return merge_impl<DT_F16>(g, rec_idx, rec_val, rec_capacity, rec_count);
    case LOWRANK_DTYPE_BFLOAT16: return merge_impl<DT_BF16>(g, rec_idx, rec_val, rec_capacity, rec_count);
    default: return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  }
}

// Factor element (row-major index via strides) widened to float: exact for all three dtypes.
static inline float load_factor(const void *p, int64_t off, int dtype) {
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32: return ((const float *)p)[off];
    case LOWRANK_DTYPE_FLOAT16: return half_to_float(((const uint16_t *)p)[off]);
    default: return bf16_to_float(((const uint16_t *)p)[off]);
  }
}

static inline float round_up_float(double x) {
  float f = (float)x;
  return (double)f < x ? nextafterf(f, INFINITY) : f;
}

extern "C" int lowrank_cpu_merge_strided(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                                         const void *b, int64_t b_s0, int64_t b_s1, const void *a,
                                         int64_t a_s0, int64_t a_s1, int factor_dtype, int64_t rank,
                                         double scale, int32_t *rec_idx, void *rec_val,
                                         int64_t rec_capacity, int64_t *rec_count) {
  if (rows < 0 || cols < 0 || rank < 1 || rank > 256) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (factor_dtype < LOWRANK_DTYPE_FLOAT32 || factor_dtype > LOWRANK_DTYPE_BFLOAT16) return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  if (rows == 0 || cols == 0) {
    if (rec_count) *rec_count = 0;
    return LOWRANK_OK;
  }
  if (!b || !a || !isfinite(scale)) return LOWRANK_ERR_INVALID_ARGUMENT;
  std::vector<float> b32, a32, a32t, rb, cb;
  try {
    b32.resize((size_t)(rows * rank));
    a32.resize((size_t)(rank * cols));
    a32t.resize((size_t)(rank * cols));
    rb.resize((size_t)rows);
    cb.resize((size_t)cols);
  } catch (const std::bad_alloc &) {
    return LOWRANK_ERR_OUT_OF_MEMORY;
  }
  // The bounds of merge_math.h, from norms summed in double.
  const double u = 5.9604644775390625e-08, r = (double)rank;
  const double gamma = r * u / (1.0 - r * u);
  const double c = fabs(scale) * (gamma * (1.0 + u) + u) * (1.0 + 3.814697265625e-06);
  bool finite = true;
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0.0;
    for (int64_t k = 0; k < rank; ++k) {
      const float x = load_factor(b, i * b_s0 + k * b_s1, factor_dtype);
      b32[i * rank + k] = x;
      ss += (double)x * x;
    }
    finite &= isfinite(ss) != 0;
    rb[i] = round_up_float(c * sqrt(ss));
  }
  std::vector<double> col_ss((size_t)cols, 0.0);
  for (int64_t k = 0; k < rank; ++k) {
    for (int64_t j = 0; j < cols; ++j) {
      const float x = load_factor(a, k * a_s0 + j * a_s1, factor_dtype);
      a32[k * cols + j] = x;
      a32t[j * rank + k] = x;
      col_ss[j] += (double)x * x;
    }
  }
  for (int64_t j = 0; j < cols; ++j) {
    finite &= isfinite(col_ss[j]) != 0;
    cb[j] = round_up_float(sqrt(col_ss[j]));
  }
  if (!finite) return LOWRANK_ERR_NONFINITE;
  const float abs_bound = round_up_float(1.1754943508222875e-38 * std::max(1.0, r * fabs(scale) * 1.01));
  if (ldw < cols || !w) return LOWRANK_ERR_INVALID_ARGUMENT;
  const bool record = rec_idx != nullptr;
  if (record && (!rec_val || !rec_count || rec_capacity < 0 || rows * cols > INT32_MAX))
    return LOWRANK_ERR_INVALID_ARGUMENT;
  Args g{w, rows, cols, ldw, b32.data(), a32.data(), a32t.data(), rank, rb.data(), cb.data(), abs_bound, scale, record};
  return merge_dispatch(g, dtype, rec_idx, rec_val, rec_capacity, rec_count);
}

template <typename T>
static int restore_impl(T *w, int64_t rows, int64_t cols, int64_t ldw, const int32_t *idx,
                        const T *val, int64_t count) {
  for (int64_t n = 0; n < count; ++n)
    if (idx[n] < 0 || idx[n] >= rows * cols) return LOWRANK_ERR_INVALID_ARGUMENT;
  for (int64_t n = 0; n < count; ++n) w[(idx[n] / cols) * ldw + idx[n] % cols] = val[n];
  return LOWRANK_OK;
}

extern "C" int lowrank_cpu_restore(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                                   const int32_t *rec_idx, const void *rec_val, int64_t count) {
  if (count == 0) return LOWRANK_OK;
  if (!w || !rec_idx || !rec_val || count < 0 || rows < 0 || cols <= 0 || ldw < cols)
    return LOWRANK_ERR_INVALID_ARGUMENT;
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32:
      return restore_impl((uint32_t *)w, rows, cols, ldw, rec_idx, (const uint32_t *)rec_val, count);
    case LOWRANK_DTYPE_FLOAT16:
    case LOWRANK_DTYPE_BFLOAT16:
      return restore_impl((uint16_t *)w, rows, cols, ldw, rec_idx, (const uint16_t *)rec_val, count);
    default: return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  }
}
