// DoRA merge / unmerge on the CPU (OpenMP): lowrank.h's lowrank_cpu_dora_merge / _unmerge.
//
// The arithmetic is the pure-torch path's (lowrank/ops/dora_merge.py), operation for operation in
// float64 -- the delta summed in rank order, a product then a sum per step (this file is built with
// -ffp-contract=off: no fma may fuse them) -- and one rounding to the weight's dtype
// (merge_math.h), so the bits are the same. Work goes in tasks of RB storage rows; inside a task,
// JT columns at a time, the rank loop updates RB x JT float64 accumulators from one load of a
// factor row (the inner loop vectorizes), then each element is rounded.
//
// A weight handed over as the transpose of its storage (a Conv1D weight: ws0 == 1) is walked in
// storage order: storage row p is logical column j, its elements the logical rows i, with the
// factors transposed here (r (N + K) doubles) -- the same products (a * b == b * a exactly) summed
// in the same order, the row scale indexed per element instead of per storage row.
#include "lowrank.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

#include "merge_math.h"

using namespace lowrank;

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DORA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#else
#define DORA_CLONES __attribute__((noinline))
#endif

constexpr int RB = 4;    // storage rows per task: each load of a factor row feeds RB multiply-adds
constexpr int JT = 256;  // columns per tile: RB x JT doubles = 8 KiB of accumulators, in L1

struct Rec {
  int32_t idx;
  uint32_t bits;
};

// CHECK: find overflows; RECORD: find overflows and the elements the unmerge misses (the record);
// neither writes. MERGE / UNMERGE write and allocate nothing, so once a merge starts writing nothing
// can stop it half-way.
enum Mode { CHECK = 0, MERGE = 1, RECORD = 2, UNMERGE = 3 };

struct Job {
  void *w;
  int64_t srows, scols, ld;  // storage: srows x scols, row stride ld
  bool trans;                // storage rows are the logical columns
  const double *p;           // srows x r: b, or a^T when trans
  const double *q;           // r x scols: a, or b^T when trans
  int64_t r;
  double s;
  const double *scale;  // per logical row: the merge's scale, or the unmerge's inverse
  const double *inv;    // RECORD: the inverse the unmerge will use
};

// merge_math.h's double_to_storage, branch-free so that the element loops vectorize (the same bits:
// tests/test_dora_merge_native.py holds them to the torch path's, NaN, Inf and subnormals included).
// Round-to-odd from double to float (an inexact even result steps one ulp toward d: +1 on the
// magnitude when |d| > |f|, else -1; Inf from a finite d steps to FLT_MAX, as nextafterf does), then
// nearest-even to the 16-bit format.
static inline uint32_t float_odd_bits(double d) {
  const float f = (float)d;
  const double back = (double)f;
  const uint32_t u = f2u(f);
  const uint32_t step = (uint32_t)((back != d) & (d == d) & ((u & 1u) == 0u));
  const uint32_t up = (uint32_t)(fabs(d) > fabs(back));
  return u + (step & up) - (step & (up ^ 1u));
}

template <int DT>
static inline uint32_t round_bits(double d) {
  if (DT == DT_F32) return f2u((float)d);
  const uint32_t u = float_odd_bits(d);
  const uint32_t mag = u & 0x7FFFFFFFu, nan = (uint32_t)(mag > 0x7F800000u);
  if (DT == DT_BF16) {
    const uint32_t rne = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return nan ? ((u >> 16) | 0x40u) : rne;
  }
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t normal = ((mag + 0xFFFu + ((mag >> 13) & 1u)) >> 13) - (112u << 10);
  // below 2^-14: m * 2^-24 with m rounded to the nearest even integer (exact float steps: the scaled
  // value is < 2^10, and adding then subtracting 2^23 rounds it to an integer, ties to even)
  const uint32_t low = mag < 0x38800000u ? mag : 0x38800000u;  // (clamped: the float -> int below stays defined)
  const float sub = (u2f(low) * 16777216.0f + 8388608.0f) - 8388608.0f;
  const uint32_t small = (uint32_t)(int32_t)sub;
  uint32_t out = mag >= 0x38800000u ? normal : small;
  out = mag >= 0x477FF000u ? 0x7C00u : out;  // >= 65520 (and Inf) rounds to Inf
  out = nan ? 0x7E00u : out;
  return sign | out;
}

template <int DT>
static inline double widen(uint32_t bits) {
  if (DT == DT_F32) return (double)u2f(bits);
  if (DT == DT_F16) return (double)half_to_float(bits);
  return (double)bf16_to_float(bits);
}

// dora_merge_element / dora_unmerge_element (merge_math.h) with round_bits: the same operations.
template <int DT>
static inline uint32_t merge_bits(uint32_t wbits, double acc, double s, double scale) {
  return round_bits<DT>(scale * (widen<DT>(wbits) + acc * s));
}

template <int DT>
static inline uint32_t unmerge_bits(uint32_t mbits, double acc, double s, double inv) {
  return round_bits<DT>(widen<DT>(mbits) * inv - acc * s);
}

// Logical flat index i * cols + j of storage element (row pr, column c).
static inline int64_t flat(const Job &g, int64_t pr, int64_t c) {
  return g.trans ? c * g.srows + pr : pr * g.scols + c;
}

// One task: storage rows [p0, p0 + nr), all columns. CHECK and RECORD lower *bad to the smallest flat
// index of a finite element that would become non-finite; RECORD also appends the elements whose
// unmerge would miss, in storage order (neither writes W); MERGE / UNMERGE write.
template <int DT, int MODE>
DORA_CLONES void dora_task(const Job &g, int64_t p0, int nr, std::vector<Rec> *recs, int64_t *bad) {
  using T = typename Store<DT>::T;
  alignas(64) double acc[RB][JT];
  alignas(64) double sc[JT];
  alignas(64) uint32_t wb[JT], yb[JT];
  alignas(64) int32_t flag[JT];
  std::vector<Rec> part[RB];  // each row's records, appended to *recs in row order at the end
  const int64_t r = g.r;
  for (int64_t c0 = 0; c0 < g.scols; c0 += JT) {
    const int nc = (int)std::min<int64_t>(JT, g.scols - c0);
    for (int q = 0; q < nr; ++q)
      for (int j = 0; j < nc; ++j) acc[q][j] = 0.0;
    for (int64_t t = 0; t < r; ++t) {
      const double *qt = g.q + t * g.scols + c0;
      for (int q = 0; q < nr; ++q) {
        const double pq = g.p[(p0 + q) * r + t];
        double *aq = acc[q];
#pragma omp simd
        for (int j = 0; j < nc; ++j) aq[j] = aq[j] + pq * qt[j];  // a product, then a sum: no fma
      }
    }
    for (int q = 0; q < nr; ++q) {
      const int64_t pr = p0 + q;
      T *wrow = (T *)g.w + pr * g.ld + c0;
      const double *aq = acc[q];
      // The per-element scale as an array (a row's one value, or a transposed weight's per column), so
      // that the element loops below have no branch and vectorize.
      for (int j = 0; j < nc; ++j) sc[j] = g.trans ? g.scale[c0 + j] : g.scale[pr];
      for (int j = 0; j < nc; ++j) wb[j] = wrow[j];
      if (MODE == UNMERGE) {
#pragma omp simd
        for (int j = 0; j < nc; ++j) yb[j] = unmerge_bits<DT>(wb[j], aq[j], g.s, sc[j]);
        for (int j = 0; j < nc; ++j) wrow[j] = (T)yb[j];
        continue;
      }
      int32_t any = 0;
#pragma omp simd reduction(| : any)
      for (int j = 0; j < nc; ++j) {
        const uint32_t y = merge_bits<DT>(wb[j], aq[j], g.s, sc[j]);
        yb[j] = y;
        const int32_t f = MODE != MERGE ? (int32_t)(storage_nonfinite<DT>(y) & !storage_nonfinite<DT>(wb[j])) : 0;
        flag[j] = f;
        any |= f;
      }
      if (MODE == MERGE) {
        for (int j = 0; j < nc; ++j) wrow[j] = (T)yb[j];
        continue;
      }
      if (any)
        for (int j = 0; j < nc; ++j)
          if (flag[j]) *bad = std::min(*bad, flat(g, pr, c0 + j));
      if (MODE == RECORD) {
        any = 0;
        for (int j = 0; j < nc; ++j) sc[j] = g.trans ? g.inv[c0 + j] : g.inv[pr];
#pragma omp simd reduction(| : any)
        for (int j = 0; j < nc; ++j) {
          const int32_t f = (int32_t)(unmerge_bits<DT>(yb[j], aq[j], g.s, sc[j]) != wb[j]);
          flag[j] = f;
          any |= f;
        }
        if (any)
          for (int j = 0; j < nc; ++j)
            if (flag[j]) part[q].push_back(Rec{(int32_t)flat(g, pr, c0 + j), wb[j]});
      }
    }
  }
  if (MODE == RECORD)
    for (int q = 0; q < nr; ++q) recs->insert(recs->end(), part[q].begin(), part[q].end());
}

// All tasks of one mode over OpenMP's static schedule (thread t: one contiguous run of tasks, so the
// threads' records concatenated in thread order are in storage order). Returns false on OOM.
template <int DT, int MODE>
bool run_all(const Job &g, std::vector<std::vector<Rec>> *recs, int64_t *bad) {
  const int64_t tasks = (g.srows + RB - 1) / RB;
  const int nthreads = (int)std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), tasks));
  if (recs) recs->assign(nthreads, {});
  int64_t worst = INT64_MAX;
  bool oom = false;
#pragma omp parallel num_threads(nthreads) reduction(min : worst) reduction(|| : oom)
  {
    std::vector<Rec> *mine = recs ? &(*recs)[omp_get_thread_num()] : nullptr;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      if (oom) continue;
      try {
        dora_task<DT, MODE>(g, t * RB, (int)std::min<int64_t>(RB, g.srows - t * RB), mine, &worst);
      } catch (const std::bad_alloc &) {
        oom = true;
      }
    }
  }
  if (bad) *bad = worst;
  return !oom;
}

static double max_finite(int dt) {
  if (dt == DT_F32) return 3.4028234663852886e38;
  if (dt == DT_F16) return 65504.0;
  return 3.3895313892515355e38;
}

// Whether some finite element might overflow: |merged_ij| <= |scale_i| (max |W| + |s| ||b_i|| max_j
// ||a_:,j||) (Cauchy-Schwarz; the 1e-9 covers the float64 roundings), rigorous and almost always far
// below the dtype's largest value, so the exact check (a CHECK pass) runs only for extreme
// magnitudes or scalings.
template <int DT>
bool may_overflow(const Job &g, int64_t rows, int64_t cols, const double *b, const double *a) {
  using T = typename Store<DT>::T;
  double wmax = 0.0;
#pragma omp parallel for schedule(static) reduction(max : wmax)
  for (int64_t pr = 0; pr < g.srows; ++pr) {
    const T *wrow = (const T *)g.w + pr * g.ld;
    for (int64_t c = 0; c < g.scols; ++c) {
      const double v = fabs(storage_to_double<DT>(wrow[c]));
      if (v <= 1.7976931348623157e308) wmax = std::max(wmax, v);  // finite elements only (NaN fails too)
    }
  }
  double amax = 0.0;
  for (int64_t j = 0; j < cols; ++j) {
    double ss = 0.0;
    for (int64_t t = 0; t < g.r; ++t) ss += a[t * cols + j] * a[t * cols + j];
    amax = std::max(amax, sqrt(ss));
  }
  const double top = max_finite(DT);
  for (int64_t i = 0; i < rows; ++i) {
    double ss = 0.0;
    for (int64_t t = 0; t < g.r; ++t) ss += b[i * g.r + t] * b[i * g.r + t];
    const double bound = fabs(g.scale[i]) * (wmax + fabs(g.s) * sqrt(ss) * amax) * (1.0 + 1e-9);
    if (!(bound < top)) return true;
  }
  return false;
}

template <int DT>
int dora_merge_impl(Job g, int64_t rows, int64_t cols, const double *b, const double *a, int32_t *rec_idx,
                    void *rec_val, int64_t cap, int64_t *count, int64_t *bad_index) {
  using T = typename Store<DT>::T;
  auto overflow = [&](int64_t bad) {
    if (bad_index) *bad_index = bad;
    return LOWRANK_ERR_OVERFLOW;
  };
  if (!rec_idx) {
    if (may_overflow<DT>(g, rows, cols, b, a)) {
      int64_t bad = INT64_MAX;
      run_all<DT, CHECK>(g, nullptr, &bad);
      if (bad != INT64_MAX) return overflow(bad);
    }
    return run_all<DT, MERGE>(g, nullptr, nullptr) ? LOWRANK_OK : LOWRANK_ERR_OUT_OF_MEMORY;
  }
  // Pass 1 finds the overflows and the record without writing; every failure (overflow, out of
  // memory, a record larger than the caller's buffer) returns with W untouched. Pass 2 writes and
  // allocates nothing. (Two passes of the rank loop where a merge-then-undo would take one; the
  // undo could not restore W if memory ran out half-way.)
  std::vector<std::vector<Rec>> recs;
  int64_t bad = INT64_MAX;
  if (!run_all<DT, RECORD>(g, &recs, &bad)) return LOWRANK_ERR_OUT_OF_MEMORY;
  if (bad != INT64_MAX) return overflow(bad);
  int64_t total = 0;
  for (const auto &v : recs) total += (int64_t)v.size();
  *count = total;
  if (total > cap) return LOWRANK_ERR_CAPACITY;
  T *vals = (T *)rec_val;
  if (!g.trans) {  // storage order is index order
    int64_t n = 0;
    for (const auto &v : recs)
      for (const Rec &rc : v) {
        rec_idx[n] = rc.idx;
        vals[n++] = (T)rc.bits;
      }
  } else {  // storage order is column-major: sort into index order
    std::vector<Rec> all;
    try {
      all.reserve((size_t)total);
    } catch (const std::bad_alloc &) {
      return LOWRANK_ERR_OUT_OF_MEMORY;
    }
    for (auto &v : recs) {
      all.insert(all.end(), v.begin(), v.end());
      std::vector<Rec>().swap(v);
    }
    std::sort(all.begin(), all.end(), [](const Rec &x, const Rec &y) { return x.idx < y.idx; });
    for (int64_t n = 0; n < total; ++n) {
      rec_idx[n] = all[(size_t)n].idx;
      vals[n] = (T)all[(size_t)n].bits;
    }
  }
  return run_all<DT, MERGE>(g, nullptr, nullptr) ? LOWRANK_OK : LOWRANK_ERR_OUT_OF_MEMORY;
}

template <int DT>
int dora_unmerge_impl(const Job &g, int64_t cols, const int32_t *rec_idx, const void *rec_val, int64_t count) {
  using T = typename Store<DT>::T;
  if (!run_all<DT, UNMERGE>(g, nullptr, nullptr)) return LOWRANK_ERR_OUT_OF_MEMORY;
  const T *vals = (const T *)rec_val;
  for (int64_t n = 0; n < count; ++n) {
    const int64_t i = rec_idx[n] / cols, j = rec_idx[n] % cols;
    ((T *)g.w)[g.trans ? j * g.ld + i : i * g.ld + j] = vals[n];
  }
  return LOWRANK_OK;
}

// Validates the layout and builds the job (transposing the factors for a transposed weight into tp
// / tq). Returns LOWRANK_OK or an error status.
int make_job(Job *g, void *w, int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, int dtype, const double *b,
             const double *a, int64_t rank, double s, std::vector<double> *tp, std::vector<double> *tq) {
  if (dtype < LOWRANK_DTYPE_FLOAT32 || dtype > LOWRANK_DTYPE_BFLOAT16) return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  if (rows < 0 || cols < 0 || rank < 1 || !w || !b || !a || !std::isfinite(s)) return LOWRANK_ERR_INVALID_ARGUMENT;
  const bool row_major = ws1 == 1 && (rows <= 1 || ws0 >= cols);
  const bool col_major = !row_major && ws0 == 1 && (cols <= 1 || ws1 >= rows);
  if (!row_major && !col_major) return LOWRANK_ERR_INVALID_ARGUMENT;
  *g = Job{w, rows, cols, ws0, false, b, a, rank, s, nullptr, nullptr};
  if (row_major) return LOWRANK_OK;
  try {
    tp->resize((size_t)(cols * rank));
    tq->resize((size_t)(rank * rows));
  } catch (const std::bad_alloc &) {
    return LOWRANK_ERR_OUT_OF_MEMORY;
  }
  for (int64_t t = 0; t < rank; ++t) {
    for (int64_t j = 0; j < cols; ++j) (*tp)[j * rank + t] = a[t * cols + j];
    for (int64_t i = 0; i < rows; ++i) (*tq)[t * rows + i] = b[i * rank + t];
  }
  *g = Job{w, cols, rows, ws1, true, tp->data(), tq->data(), rank, s, nullptr, nullptr};
  return LOWRANK_OK;
}

}  // namespace

extern "C" int lowrank_cpu_dora_merge(void *w, int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, int dtype,
                                      const double *b, const double *a, int64_t rank, double s,
                                      const double *scale, const double *inv, int32_t *rec_idx, void *rec_val,
                                      int64_t rec_capacity, int64_t *rec_count, int64_t *bad_index) {
  if (rows == 0 || cols == 0) {
    if (rec_count) *rec_count = 0;
    return dtype >= LOWRANK_DTYPE_FLOAT32 && dtype <= LOWRANK_DTYPE_BFLOAT16 ? LOWRANK_OK
                                                                               : LOWRANK_ERR_UNSUPPORTED_DTYPE;
  }
  if (!scale || !inv) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (rec_idx && (!rec_val || !rec_count || rec_capacity < 0 || rows * cols > INT32_MAX))
    return LOWRANK_ERR_INVALID_ARGUMENT;
  Job g;
  std::vector<double> tp, tq;
  const int st = make_job(&g, w, rows, cols, ws0, ws1, dtype, b, a, rank, s, &tp, &tq);
  if (st != LOWRANK_OK) return st;
  g.scale = scale;
  g.inv = inv;
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32:
      return dora_merge_impl<DT_F32>(g, rows, cols, b, a, rec_idx, rec_val, rec_capacity, rec_count, bad_index);
    case LOWRANK_DTYPE_FLOAT16:
      return dora_merge_impl<DT_F16>(g, rows, cols, b, a, rec_idx, rec_val, rec_capacity, rec_count, bad_index);
    default:
      return dora_merge_impl<DT_BF16>(g, rows, cols, b, a, rec_idx, rec_val, rec_capacity, rec_count, bad_index);
  }
}

extern "C" int lowrank_cpu_dora_unmerge(void *w, int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, int dtype,
                                        const double *b, const double *a, int64_t rank, double s, const double *inv,
                                        const int32_t *rec_idx, const void *rec_val, int64_t count) {
  if (count < 0 || (count > 0 && (!rec_idx || !rec_val))) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (rows == 0 || cols == 0) return count == 0 ? LOWRANK_OK : LOWRANK_ERR_INVALID_ARGUMENT;
  if (!inv) return LOWRANK_ERR_INVALID_ARGUMENT;
  for (int64_t n = 0; n < count; ++n)  // checked before anything is written
    if (rec_idx[n] < 0 || rec_idx[n] >= rows * cols) return LOWRANK_ERR_INVALID_ARGUMENT;
  Job g;
  std::vector<double> tp, tq;
  const int st = make_job(&g, w, rows, cols, ws0, ws1, dtype, b, a, rank, s, &tp, &tq);
  if (st != LOWRANK_OK) return st;
  g.scale = inv;
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32: return dora_unmerge_impl<DT_F32>(g, cols, rec_idx, rec_val, count);
    case LOWRANK_DTYPE_FLOAT16: return dora_unmerge_impl<DT_F16>(g, cols, rec_idx, rec_val, count);
    default: return dora_unmerge_impl<DT_BF16>(g, cols, rec_idx, rec_val, count);
  }
}
