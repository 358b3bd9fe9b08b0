// CPU half of the lowrank native library (OpenMP).
#include "lowrank.h"

#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "merge_math.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(LOWRANK_NO_AVX2)  // (-DLOWRANK_NO_AVX2: test the portable loops)
#include <immintrin.h>
#define LOWRANK_HAVE_AVX2_KERNEL 1
#endif

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
constexpr int JT = 256;  // columns per tile at most: RB x JT fp32 accumulators = 4 KiB, in L1
constexpr int RT = 32;   // rows per task at most (merge_impl)

struct Rec {
  int32_t idx;
  uint32_t bits;
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

// Nearest-even rounding to the target over the whole finite range (subnormal results and
// overflow to Inf included): the fast unmerge's rounding. fast_round agrees with it on the
// target's normal range without its top binade (`in_normal_range`, certified_*'s range), and so
// do the conversion instructions (round16) on every finite value.
template <int DT>
static inline uint32_t round_full(float v) {
  if (DT == DT_F32) return f2u(v);
  if (DT == DT_F16) return float_to_half_full(v);
  return float_to_bf16_full(v);
}

template <int DT>
static inline int32_t in_normal_range(float v) {
  if (DT == DT_F32) return 1;
  const int32_t ex = (int32_t)((f2u(v) >> 23) & 0xFFu);
  if (DT == DT_F16) return (int32_t)(ex >= 113) & (int32_t)(ex <= 141);
  return (int32_t)(ex >= 24) & (int32_t)(ex <= 253);
}

// True when the fast unmerge (unmerge_tile_fast: the fp32 round trip of this same accumulation,
// fmaf(-s32, acc, merged) rounded, no certification) would not give `orig` back for an element
// merged to `merged`: it then needs a record. A NaN / Inf round trip counts as failing, so that
// how the fast unmerge's rounding treats NaN payloads does not matter.
template <int DT>
static inline int32_t fast_trip_fails(uint32_t merged, float acc, float s32, uint32_t orig) {
  const float v2 = fmaf(-s32, acc, to_float<DT>(merged));
  return (int32_t)(!(fabsf(v2) <= 3.4028234663852886e38f)) | (int32_t)(round_full<DT>(v2) != orig);
}

struct Args {
  void *w;
  int64_t rows, cols, ldw;
  const float *b, *a;
  const float *ap;  // a in 16-column panels (see pack_panels), or null
  int64_t rank;
  const float *rb, *cb;
  float abs_bound;
  double scale;
  bool record;
  float inv_c = 0.0f;  // >= 1 / (|scale| (gamma_r (1+u) + u)) (1 + 2^-19): rb * cb * inv_c >= ||B_i|| ||A_j||
  bool prefetch = false;  // prefetch each tile's W rows (merge_impl's column-blocked order)
  int64_t rt = 0;                 // rows per task (0: merge_impl chooses)
  const uint8_t *only = nullptr;  // with rt: run only the tasks t with only[t] != 0 (an undo)
  bool fast = false;  // the fast unmerge (unmerge_tile_fast): no record, no certification
  // With fast: a strictly increasing record to write back tile by tile (put_tile_records), or null.
  const int32_t *put_idx = nullptr;
  const void *put_val = nullptr;
  int64_t put_count = 0;
  // The pair loop's operands (pack_pairs: 16-bit weights, factors all normal bf16 or zero,
  // AVX512_BF16), or null: A in pair panels, B's rows as rp = ceil(rank / 2) dwords.
  const uint32_t *ap16 = nullptr, *b16 = nullptr;
  int64_t rp = 0;
};

// merge_math.h's error_bound with the accumulation term given (ea >= |s| |acc - exact sum| +
// |s - s32| |acc|): the tight bound's, or rb * cb.
static inline float bound_from(float ea, float v, float abs_bound) {
  const float e = ea + fabsf(v) * 6.0e-8f;             /* 6.0e-8 > 2^-24 (1 + 2^-23) */
  return fmaf(e, 9.5367431640625e-07f, e) + abs_bound; /* e (1 + 2^-20): covers this line's roundings */
}

// The 4-row rank loop with its accumulators in registers (AVX2 + FMA): 16 columns x 4 rows = 8
// ymm accumulators, each k costs 2 loads of A, 4 broadcasts of B and 8 fmas. A comes in panels
// of 16 columns (ap: panel p holds a[k, 16p + c] at (p * r + k) * 16 + c, zero-padded), so a
// panel's r rows are one contiguous run: read with a row stride of cols floats (16 KiB at
// cols = 4096) the r lines of a panel all fall in one L1 set and were refetched from L2 (slower
// than the portable loop at r = 64). The portable loop keeps RB x JT accumulators in L1 and is
// store-bound (4 stores per 4 fmas). Same fma sequence per element (k ascending from +0), so
// the same bits. nc may end mid-panel: the padded columns land in acc's unused tail.
#ifdef LOWRANK_HAVE_AVX2_KERNEL
__attribute__((target("avx2,fma"), noinline)) void rank_rows4_avx2(const float *b0, int64_t r, const float *ap,
                                                                  int nc, float (*acc)[JT]) {
  for (int j = 0; j < nc; j += 16, ap += 16 * r) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
           c31 = c00;
    const float *p = ap;
    for (int64_t k = 0; k < r; ++k, p += 16) {
      const __m256 x0 = _mm256_loadu_ps(p), x1 = _mm256_loadu_ps(p + 8);
      __m256 c = _mm256_broadcast_ss(b0 + k);
      c00 = _mm256_fmadd_ps(c, x0, c00);
      c01 = _mm256_fmadd_ps(c, x1, c01);
      c = _mm256_broadcast_ss(b0 + r + k);
      c10 = _mm256_fmadd_ps(c, x0, c10);
      c11 = _mm256_fmadd_ps(c, x1, c11);
      c = _mm256_broadcast_ss(b0 + 2 * r + k);
      c20 = _mm256_fmadd_ps(c, x0, c20);
      c21 = _mm256_fmadd_ps(c, x1, c21);
      c = _mm256_broadcast_ss(b0 + 3 * r + k);
      c30 = _mm256_fmadd_ps(c, x0, c30);
      c31 = _mm256_fmadd_ps(c, x1, c31);
    }
    _mm256_storeu_ps(acc[0] + j, c00);
    _mm256_storeu_ps(acc[0] + j + 8, c01);
    _mm256_storeu_ps(acc[1] + j, c10);
    _mm256_storeu_ps(acc[1] + j + 8, c11);
    _mm256_storeu_ps(acc[2] + j, c20);
    _mm256_storeu_ps(acc[2] + j + 8, c21);
    _mm256_storeu_ps(acc[3] + j, c30);
    _mm256_storeu_ps(acc[3] + j + 8, c31);
  }
}
// The same loop with AVX-512: one zmm holds a whole 16-column panel row, two panels side by side
// give 8 independent accumulators per k (2 loads, 4 broadcasts, 8 fmas): twice the columns per
// instruction of the AVX2 kernel. Same fma sequence per element, so the same bits.
__attribute__((target("avx512f"), noinline)) void rank_rows4_avx512(const float *b0, int64_t r, const float *ap,
                                                                   int nc, float (*acc)[JT]) {
  int j = 0;
  // four panels (64 columns) at a time while they last: 16 independent fma chains per k (8 chains
  // at the fma's latency of 4 cycles on 2 ports left no slack), 4 loads + 4 broadcasts per 16 fmas
  for (; j + 48 < nc; j += 64, ap += 64 * r) {
    __m512 c0[4], c1[4], c2[4], c3[4];
    for (int p = 0; p < 4; ++p) c0[p] = c1[p] = c2[p] = c3[p] = _mm512_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      __m512 x[4];
      for (int p = 0; p < 4; ++p) x[p] = _mm512_loadu_ps(ap + p * 16 * r + 16 * k);
      const __m512 e0 = _mm512_set1_ps(b0[k]), e1 = _mm512_set1_ps(b0[r + k]);
      const __m512 e2 = _mm512_set1_ps(b0[2 * r + k]), e3 = _mm512_set1_ps(b0[3 * r + k]);
      for (int p = 0; p < 4; ++p) {
        c0[p] = _mm512_fmadd_ps(e0, x[p], c0[p]);
        c1[p] = _mm512_fmadd_ps(e1, x[p], c1[p]);
        c2[p] = _mm512_fmadd_ps(e2, x[p], c2[p]);
        c3[p] = _mm512_fmadd_ps(e3, x[p], c3[p]);
      }
    }
    for (int p = 0; p < 4; ++p) {
      _mm512_storeu_ps(acc[0] + j + 16 * p, c0[p]);
      _mm512_storeu_ps(acc[1] + j + 16 * p, c1[p]);
      _mm512_storeu_ps(acc[2] + j + 16 * p, c2[p]);
      _mm512_storeu_ps(acc[3] + j + 16 * p, c3[p]);
    }
  }
  for (; j + 16 < nc; j += 32, ap += 32 * r) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
           c31 = c00;
    const float *p0 = ap, *p1 = ap + 16 * r;
    for (int64_t k = 0; k < r; ++k) {
      const __m512 x0 = _mm512_loadu_ps(p0 + 16 * k), x1 = _mm512_loadu_ps(p1 + 16 * k);
      __m512 c = _mm512_set1_ps(b0[k]);
      c00 = _mm512_fmadd_ps(c, x0, c00);
      c01 = _mm512_fmadd_ps(c, x1, c01);
      c = _mm512_set1_ps(b0[r + k]);
      c10 = _mm512_fmadd_ps(c, x0, c10);
      c11 = _mm512_fmadd_ps(c, x1, c11);
      c = _mm512_set1_ps(b0[2 * r + k]);
      c20 = _mm512_fmadd_ps(c, x0, c20);
      c21 = _mm512_fmadd_ps(c, x1, c21);
      c = _mm512_set1_ps(b0[3 * r + k]);
      c30 = _mm512_fmadd_ps(c, x0, c30);
      c31 = _mm512_fmadd_ps(c, x1, c31);
    }
    _mm512_storeu_ps(acc[0] + j, c00);
    _mm512_storeu_ps(acc[0] + j + 16, c01);
    _mm512_storeu_ps(acc[1] + j, c10);
    _mm512_storeu_ps(acc[1] + j + 16, c11);
    _mm512_storeu_ps(acc[2] + j, c20);
    _mm512_storeu_ps(acc[2] + j + 16, c21);
    _mm512_storeu_ps(acc[3] + j, c30);
    _mm512_storeu_ps(acc[3] + j + 16, c31);
  }
  if (j < nc) {  // one last panel (nc may end inside it: the padded columns land in acc's tail)
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t k = 0; k < r; ++k) {
      const __m512 x = _mm512_loadu_ps(ap + 16 * k);
      c0 = _mm512_fmadd_ps(_mm512_set1_ps(b0[k]), x, c0);
      c1 = _mm512_fmadd_ps(_mm512_set1_ps(b0[r + k]), x, c1);
      c2 = _mm512_fmadd_ps(_mm512_set1_ps(b0[2 * r + k]), x, c2);
      c3 = _mm512_fmadd_ps(_mm512_set1_ps(b0[3 * r + k]), x, c3);
    }
    _mm512_storeu_ps(acc[0] + j, c0);
    _mm512_storeu_ps(acc[1] + j, c1);
    _mm512_storeu_ps(acc[2] + j, c2);
    _mm512_storeu_ps(acc[3] + j, c3);
  }
}
// rank_rows4_avx512 that also sums the magnitudes of every second partial sum, for the tight bound
// (certify_row_avx512). With s_0 = 0, s_k = fl(s_{k-1} + p_k) (k = 1 .. r, one rounding per fma,
// p_k exact) the sum's error is at most u sum_{k=1..r} |s_k|, which for terms of random sign grows
// like r^1.5 rather than the worst case's r^2 (gamma_r times the Cauchy-Schwarz product): about 15x
// tighter at r = 64, so that many fewer elements leave the fast path. sabs = T = sum of |s_k| over
// even k, plus |s_r| when r is odd: an odd k < r has |s_k| <= (1 + u) |s_{k+1}| + |p_{k+1}|, so
// sum_k |s_k| <= (2 + u) T + sum_k |p_k| <= (2 + u) T + ||B_i|| ||A_j|| (Cauchy-Schwarz, from the
// row and column bounds). Tracking every step cost an abs and an add per fma, on the same FP
// pipes (by count, 12 zmm pipe slots per k against the fmas' 8 on Zen 4): every second step halves that, for a
// bound ~20% looser at r = 64 (a few more elements on the slow path). Same fma sequence as
// rank_rows4_avx512, so the same acc bits.
template <int P>
__attribute__((target("avx512f"), always_inline)) static inline void rank_step(const float *b0, int64_t r,
                                                                               const float *const *pp, int64_t k,
                                                                               __m512 (*c)[RB]) {
  __m512 x[P];
  for (int p = 0; p < P; ++p) x[p] = _mm512_loadu_ps(pp[p] + 16 * k);
  for (int q = 0; q < RB; ++q) {
    const __m512 e = _mm512_set1_ps(b0[q * r + k]);
    for (int p = 0; p < P; ++p) c[p][q] = _mm512_fmadd_ps(e, x[p], c[p][q]);
  }
}

template <int P>
__attribute__((target("avx512f"), always_inline)) static inline void track_step(__m512 (*c)[RB], __m512 (*t)[RB]) {
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < RB; ++q) t[p][q] = _mm512_add_ps(t[p][q], _mm512_abs_ps(c[p][q]));
}

// P panels (16 P columns) of rank_rows4_avx512_abs: 4 P fma chains and their sums in registers
// (P = 3: with the operands, 28 of the 32 zmm). pp[p] is panel p; the stores cover the first
// `keep` panels (one panel left: P = 2 with pp[1] == pp[0], computed twice, stored once).
template <int P>
__attribute__((target("avx512f"), always_inline)) static inline void rank_panels_abs(const float *b0, int64_t r,
                                                                                     const float *const *pp,
                                                                                     float (*acc)[JT],
                                                                                     float (*sabs)[JT], int j,
                                                                                     int keep) {
  __m512 c[P][RB], t[P][RB];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < RB; ++q) c[p][q] = t[p][q] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 1 < r; k += 2) {
    rank_step<P>(b0, r, pp, k, c);
    rank_step<P>(b0, r, pp, k + 1, c);
    track_step<P>(c, t);  // |s_{k+2}|, k + 2 even (1-based)
  }
  if (k < r) {  // r odd: the last partial sum is tracked too
    rank_step<P>(b0, r, pp, k, c);
    track_step<P>(c, t);
  }
  for (int p = 0; p < keep; ++p)
    for (int q = 0; q < RB; ++q) {
      _mm512_storeu_ps(acc[q] + j + 16 * p, c[p][q]);
      _mm512_storeu_ps(sabs[q] + j + 16 * p, t[p][q]);
    }
}

__attribute__((target("avx512f"), noinline)) void rank_rows4_avx512_abs(const float *b0, int64_t r, const float *ap,
                                                                       int nc, float (*acc)[JT], float (*sabs)[JT]) {
  int j = 0;
  for (; j + 32 < nc; j += 48, ap += 48 * r) {  // three panels while they last: 12 chains
    const float *pp[3] = {ap, ap + 16 * r, ap + 32 * r};
    rank_panels_abs<3>(b0, r, pp, acc, sabs, j, 3);
  }
  for (; j < nc; j += 32, ap += 32 * r) {  // then two (8 chains), or the last one
    const bool two = j + 16 < nc;
    const float *pp[2] = {ap, two ? ap + 16 * r : ap};
    rank_panels_abs<2>(b0, r, pp, acc, sabs, j, two ? 2 : 1);
  }
}

// The rank loop in double for the f64 path (merge_tile_f64): 16 columns of A widened to two zmm
// of doubles, 4 rows of B broadcast, 8 fmas per k. Products of floats are exact in double, so
// fma(b, a, acc) is acc + b * a rounded once: the slow path's sum, +0 + p_0 + ... + p_{r-1} in
// that order, bit for bit.
__attribute__((target("avx512f"), noinline)) void rank_rows4_avx512_f64(const float *b0, int64_t r, const float *ap,
                                                                       int nc, double (*acc)[JT]) {
  for (int j = 0; j < nc; j += 16, ap += 16 * r) {
    __m512d c00 = _mm512_setzero_pd(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00;
    for (int64_t k = 0; k < r; ++k) {
      const __m512d x0 = _mm512_cvtps_pd(_mm256_loadu_ps(ap + 16 * k));
      const __m512d x1 = _mm512_cvtps_pd(_mm256_loadu_ps(ap + 16 * k + 8));
      __m512d c = _mm512_set1_pd((double)b0[k]);
      c00 = _mm512_fmadd_pd(c, x0, c00);
      c01 = _mm512_fmadd_pd(c, x1, c01);
      c = _mm512_set1_pd((double)b0[r + k]);
      c10 = _mm512_fmadd_pd(c, x0, c10);
      c11 = _mm512_fmadd_pd(c, x1, c11);
      c = _mm512_set1_pd((double)b0[2 * r + k]);
      c20 = _mm512_fmadd_pd(c, x0, c20);
      c21 = _mm512_fmadd_pd(c, x1, c21);
      c = _mm512_set1_pd((double)b0[3 * r + k]);
      c30 = _mm512_fmadd_pd(c, x0, c30);
      c31 = _mm512_fmadd_pd(c, x1, c31);
    }
    _mm512_storeu_pd(acc[0] + j, c00);
    _mm512_storeu_pd(acc[0] + j + 8, c01);
    _mm512_storeu_pd(acc[1] + j, c10);
    _mm512_storeu_pd(acc[1] + j + 8, c11);
    _mm512_storeu_pd(acc[2] + j, c20);
    _mm512_storeu_pd(acc[2] + j + 8, c21);
    _mm512_storeu_pd(acc[3] + j, c30);
    _mm512_storeu_pd(acc[3] + j + 8, c31);
  }
}

// The rank loop on bf16 pairs (AVX512_BF16's vdpbf16ps), for factors whose every value is a
// normal bf16 number or zero (pack_pairs): 16 lanes x 2 products per instruction, twice the fp32
// fma's arithmetic per instruction. A pair of rank steps in one instruction: per element
// acc <- (acc + a[2kk+1] b[2kk+1]) + a[2kk] b[2kk]: two fused multiply-adds (a product of 8-bit
// significands, exact, inside each), each rounded to nearest even, subnormal inputs and results
// flushed to zero (no MXCSR) -- checked against a scalar emulation on AMD Zen 4. So the bits are not the fp32
// loop's, but they are this loop's on every run on any CPU with the instruction: a merge and its
// fast unmerge take the same loop (merge_impl decides from the factors and the CPU alone;
// lowrank_cpu_rank_loop_kind tells Python which loops a record was made with). The error bound
// is the fp32 loop's (rank_rows4_avx512_abs): a sum of r exact products, one rounding per add in
// the order p1, p0, p3, p2, ...; every intermediate |s + p_odd| <= |s'| / (1 - u) + |p_even| (s' the
// pair's result), so the sum of all partial-sum magnitudes is at most (2 + u) T + sum |p_k| with
// T the sum over pairs of |s'| (r odd: the pad's zero product comes first, an exact add). The
// magnitude tracking keeps M = max |s'| with one vrangeps (the sum's abs + add pair cost as much
// as the vdpbf16ps themselves: one thread, 1024 x 4096, r = 64, 4.2-5.1 ms with it against 2.9-3.5
// ms with vrangeps, the fp32 loop 6.5-8.7 ms) and stores T = rp * M >= T: a bound ~1.5x looser on
// that term for a random walk (slightly more elements on the slow path; fewer instructions won).
// The flushes: each half of the instruction is a fused multiply-add whose result is flushed when
// subnormal (the product itself is not rounded or flushed: checked against an emulation on Zen 4,
// 32M lanes), so at most 2^-126 per step, r in all -- what merge_strided's underflow slack already
// covers; merge_impl adds it again for direct lowrank_cpu_merge callers.
// ap16: panel p holds, for pair kk, 16 dwords (a[2kk, c] in the low half, a[2kk+1, c] in the
// high, c < 16, zero-padded); b0: RB rows of rp dwords (b[i, 2kk] low, b[i, 2kk+1] high).
template <int P, bool TRACK>
__attribute__((target("avx512f,avx512dq,avx512bf16"), always_inline)) static inline void pair_panels(
    const uint32_t *b0, int64_t rp, const uint32_t *const *pp, float (*acc)[JT], float (*sabs)[JT], int j, int keep) {
  __m512 c[P][RB], t[P][RB];
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < RB; ++q) c[p][q] = t[p][q] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < rp; ++kk) {
    __m512bh x[P];
    for (int p = 0; p < P; ++p) x[p] = (__m512bh)_mm512_loadu_si512(pp[p] + 16 * kk);
    for (int q = 0; q < RB; ++q) {
      const __m512bh e = (__m512bh)_mm512_set1_epi32((int)b0[q * rp + kk]);
      for (int p = 0; p < P; ++p) c[p][q] = _mm512_dpbf16_ps(c[p][q], e, x[p]);
    }
    if (TRACK)  // t = max(|t|, |c|): vrangeps (max magnitude, sign cleared), one instruction
      for (int p = 0; p < P; ++p)
        for (int q = 0; q < RB; ++q) t[p][q] = _mm512_range_ps(t[p][q], c[p][q], 0x0B);
  }
  const __m512 n = _mm512_set1_ps((float)rp);
  for (int p = 0; p < keep; ++p)
    for (int q = 0; q < RB; ++q) {
      _mm512_storeu_ps(acc[q] + j + 16 * p, c[p][q]);
      if (TRACK) _mm512_storeu_ps(sabs[q] + j + 16 * p, _mm512_mul_ps(n, t[p][q]));
    }
}

// RB rows x nc columns of the pair loop: P = 4 panels at a time without tracking (16 chains),
// 3 with it (24 accumulators), then 2 or the last one.
template <bool TRACK>
__attribute__((target("avx512f,avx512dq,avx512bf16"), noinline)) void rank_rows4_pairs(const uint32_t *b0, int64_t rp,
                                                                            const uint32_t *ap, int nc,
                                                                            float (*acc)[JT], float (*sabs)[JT]) {
  constexpr int P = TRACK ? 3 : 4;
  int j = 0;
  for (; j + 16 * (P - 1) < nc; j += 16 * P, ap += 16 * P * rp) {
    const uint32_t *pp[P];
    for (int p = 0; p < P; ++p) pp[p] = ap + 16 * p * rp;
    pair_panels<P, TRACK>(b0, rp, pp, acc, sabs, j, P);
  }
  for (; j < nc; j += 32, ap += 32 * rp) {
    const bool two = j + 16 < nc;
    const uint32_t *pp[2] = {ap, two ? ap + 16 * rp : ap};
    pair_panels<2, TRACK>(b0, rp, pp, acc, sabs, j, two ? 2 : 1);
  }
}

static bool detect_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && std::getenv("LOWRANK_NO_AVX512") == nullptr;
}
static const bool g_avx512 = detect_avx512();

// AVX512_BF16 for the pair loop (rank_rows4_pairs); LOWRANK_NO_BF16_DOT set: never (tests compare).
static bool detect_bf16_dot() {
  __builtin_cpu_init();
  return g_avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512dq") &&
         std::getenv("LOWRANK_NO_BF16_DOT") == nullptr;
}
static const bool g_bf16_dot = detect_bf16_dot();

static bool detect_avx2_fma() {
  __builtin_cpu_init();  // needed before __builtin_cpu_supports in a static initializer
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
static const bool g_avx2_fma = detect_avx2_fma();

// Bit `BIT` of flag[0 .. JT) as JT / 64 masks, 8 flags per movemask.
template <int BIT>
__attribute__((target("avx2"), noinline)) void flag_masks_avx2(const int32_t *flag, uint64_t *m) {
  for (int w = 0; w < JT / 64; ++w) {
    uint64_t x = 0;
    for (int c = 0; c < 8; ++c) {
      const __m256i v = _mm256_slli_epi32(_mm256_load_si256((const __m256i *)(flag + w * 64 + c * 8)), 31 - BIT);
      x |= (uint64_t)(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(v)) << (c * 8);
    }
    m[w] = x;
  }
}
#else
static const bool g_avx2_fma = false;
static const bool g_avx512 = false;
static const bool g_bf16_dot = false;
#endif

// Bit BIT of flag[0 .. nc) as masks (bits >= nc clear). Flags are rare (records ~8%, the double
// path ~0.1-2%) and scattered: visiting set bits beats a per-element branch (mispredicts) and a
// branch-free append (serial on its counter: it was 40% of an exact merge's time).
template <int BIT>
static inline void flag_masks(const int32_t *flag, int nc, uint64_t m[JT / 64]) {
#ifdef LOWRANK_HAVE_AVX2_KERNEL
  if (g_avx2_fma) {
    flag_masks_avx2<BIT>(flag, m);
  } else
#endif
  {
    for (int w = 0; w < JT / 64; ++w) {
      uint64_t x = 0;
      for (int c = 0; c < 64; ++c) x |= (uint64_t)((flag[w * 64 + c] >> BIT) & 1) << c;
      m[w] = x;
    }
  }
  for (int w = 0; w < JT / 64; ++w) {
    const int live = nc - w * 64;
    if (live <= 0) m[w] = 0;
    else if (live < 64) m[w] &= (1ull << live) - 1;
  }
}

#ifdef LOWRANK_HAVE_AVX2_KERNEL
// append_records' gathering with AVX-512, 16 flags per step and no branch on them: the flagged
// lanes' indices and bits compressed to the front of two registers, interleaved into 8-byte Recs
// and stored whole (16 Recs, however many are flagged: tmp holds JT + 16). The set-bit loop's exit
// mispredicted once per 64 flags (a record every ~20 elements at a delta of 5% of W's rms):
// with flag_masks it was 5.5% of a fp16 r = 16 round trip's samples (one thread, 1024 x 4096).
__attribute__((target("arch=x86-64-v4"), noinline)) static int compress_records_avx512(const int32_t *flag, int nc,
                                                                                      const uint32_t *wb, int32_t base,
                                                                                      Rec *tmp) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  int cnt = 0;
  for (int j = 0; j < nc; j += 16) {
    const __mmask16 live = nc - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nc - j)) - 1u);
    const __mmask16 m = _mm512_mask_test_epi32_mask(live, _mm512_loadu_si512(flag + j), one);
    const __m512i ci = _mm512_maskz_compress_epi32(m, _mm512_add_epi32(_mm512_set1_epi32(base + j), iota));
    const __m512i cb = _mm512_maskz_compress_epi32(m, _mm512_loadu_si512(wb + j));
    _mm512_storeu_si512(tmp + cnt, _mm512_permutex2var_epi32(ci, lo, cb));
    _mm512_storeu_si512(tmp + cnt + 8, _mm512_permutex2var_epi32(ci, hi, cb));
    cnt += __builtin_popcount((unsigned)m);
  }
  return cnt;
}
#endif

// The elements of a tile row flagged in bit 0 (their round trip fails), appended in column order
// as (flat index, original bits).
static void append_records(const int32_t *flag, int nc, const uint32_t *wb, int32_t base, std::vector<Rec> &out) {
  Rec tmp[JT + 16];
  int cnt = 0;
#ifdef LOWRANK_HAVE_AVX2_KERNEL
  if (g_avx512) {
    cnt = compress_records_avx512(flag, nc, wb, base, tmp);
    out.insert(out.end(), tmp, tmp + cnt);
    return;
  }
#endif
  uint64_t mk[JT / 64];
  flag_masks<0>(flag, nc, mk);
  for (int w = 0; w < JT / 64; ++w) {
    for (uint64_t x = mk[w]; x; x &= x - 1) {
      const int j = w * 64 + __builtin_ctzll(x);
      tmp[cnt++] = Rec{base + j, wb[j]};
    }
  }
  out.insert(out.end(), tmp, tmp + cnt);
}

// The fast path's epilogue for one tile row with the Cauchy-Schwarz bound: v = W + s32 * acc
// rounded to the target (yb), and per element flag bit 1 when v is not certified (the bound's
// accumulation term rb * cb, whose rounding the 2^-18 inflation of rb covers), bit 0 (RECORD)
// when the round trip v2 = round(v) - s32 * acc is not certified or its rounding is not W (the
// record rule: see merge_tile). Returns the OR of the flags. Inlined into each clone
// of merge_tile. (With AVX-512 and 16-bit weights, certify_row_avx512 below takes the tight bound.)
template <int DT, bool RECORD>
__attribute__((always_inline)) inline int32_t certify_row(const float *accq, float s32, float rbi, const float *cbj,
                                                          float abs_bound, const uint32_t *wb, uint32_t *yb,
                                                          int32_t *flag, int nc) {
  int32_t any = 0;
#pragma omp simd reduction(| : any)
  for (int j = 0; j < nc; ++j) {
    const float v = fmaf(s32, accq[j], to_float<DT>(wb[j]));
    const uint32_t y = fast_round<DT>(v);
    int32_t f = 0;
    if (DT == DT_F32) {
      if (RECORD) f = (int32_t)(f2u(fmaf(-s32, accq[j], v)) != wb[j]);
    } else {
      const float ea = rbi * cbj[j];
      const int32_t ok1 = certified<DT>(v, bound_from(ea, v, abs_bound));
      if (RECORD) {
        const float v2 = fmaf(-s32, accq[j], to_float<DT>(y));
        const int32_t n2 = in_normal_range<DT>(v2);  // else the slow path decides (bit 1)
        const int32_t ok2 = certified<DT>(v2, bound_from(ea, v2, abs_bound));
        f = (int32_t)(fast_round<DT>(v2) != wb[j]) | (n2 & (1 - ok2)) | ((1 - (ok1 & n2)) << 1);
      } else {
        f = (1 - ok1) << 1;
      }
    }
    yb[j] = y;
    flag[j] = f;
    any |= f;
  }
  return any;
}

#ifdef LOWRANK_HAVE_AVX2_KERNEL
// The epilogue with the tight bound for 16-bit weights (AVX-512, after rank_rows4_avx512_abs), 16
// elements per step, reading and writing W's row directly. Per element: v = W + s32 * acc, the
// bound's accumulation term ea = |s32| u (1 + 1e-4) (|acc| + 2 T + ||B_i|| ||A_j||) (T = sabs, see
// rank_rows4_avx512_abs; |acc| covers s32 != s; the slack covers 1 / (1 - u), u T, T's own
// roundings (gamma_128 < 1e-5) and the few roundings of this sum and the next line's), flag bit 1 when v
// is not certified, bit 0 (RECORD) when the round trip's v2 = round(v) - s32 * acc is not
// certified or round(v2) is not W (the record rule: see merge_tile). The fp16 widening and rounding are the conversion
// instructions (vcvtph2ps is exact; vcvtps2ph is the nearest-even rounding on every finite value,
// subnormal results included, which certified16 also certifies for fp16; elements it does not
// certify are redone by the slow path), the bound's float
// operations are bound_from's and certified_*'s, one for one (explicit, and the library is built
// with -ffp-contract=off). (Written as a `TIGHT` variant of certify_row, GCC's vectorization kept
// the branch-free emulations of the conversions and rematerialized its constants inside the
// loop: at r = 16 that epilogue cost twice the rank loop.) wb receives the original bits (widened),
// flag bit 0 / 1 as certify_row's (tail lanes untouched), W the fast path's rounding.
// Nearest-even rounding to the 16-bit target (every finite value; NaN: fp16 keeps a quiet NaN, bf16
// may not), results in 16-bit lanes.
template <int DT>
__attribute__((target("arch=x86-64-v4"), always_inline)) static inline __m256i round16(__m512 v) {
  if (DT == DT_F16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi16(
      _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16));
}

// Whether every real number within e of v rounds (nearest-even, to the 16-bit target) to the same
// bits as v. fp16: v - e rounded down and v + e rounded up (embedded rounding: no real number of
// the interval lies outside them) round to the same bits, and v is not NaN; rounding is monotone,
// so the exact value then rounds to those bits too. One test for every finite value -- normal,
// subnormal and zero results (fp16 results below 2^-14: 0.24% of N(0, 0.02) weights, which the
// distance-to-midpoint test below sent to the slow path, twice in exact mode), cheaper than that
// test, and an interval holding both signs of zero is left uncertified (a zero result's sign is
// the exact value's). round16 for fp16 is the conversion instruction, correct on every finite
// value; the fast unmerge rounds with it too. bf16 (where round16 is integer arithmetic, and the
// two roundings cost more than this test): v farther than e from the nearest rounding midpoint,
// whose distance d * ulp32(v) is exact, on the normal range only (normal16).
template <int DT>
__attribute__((target("arch=x86-64-v4"), always_inline)) static inline __mmask16 certified16(__m512 v, __m512 e) {
  if (DT == DT_F16) {
    const __m512 lo = _mm512_sub_round_ps(v, e, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 hi = _mm512_add_round_ps(v, e, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
    // (a NaN bound -- 0 * Inf in the bound's terms, a scale below float's range with huge factors --
    // rounds both ends to the same NaN bits: never certified, as e < room refuses it for bf16)
    return _mm256_cmpeq_epi16_mask(round16<DT>(lo), round16<DT>(hi)) & _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q) &
           _mm512_cmp_ps_mask(e, e, _CMP_ORD_Q);
  }
  const __m512i u = _mm512_castps_si512(v);
  const __m512i ex = _mm512_and_si512(_mm512_srli_epi32(u, 23), _mm512_set1_epi32(0xFF));
  const __m512i low = _mm512_and_si512(u, _mm512_set1_epi32(0xFFFF));
  __m512i d = _mm512_abs_epi32(_mm512_sub_epi32(low, _mm512_set1_epi32(0x8000)));
  d = _mm512_min_epi32(d, _mm512_set1_epi32(0x4000));  // the next binade's midpoints are >= 2^14 ulps away
  const __m512i exc = _mm512_max_epi32(ex, _mm512_set1_epi32(24));
  const __m512 ulp = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(exc, _mm512_set1_epi32(23)), 23));
  const __m512 room = _mm512_mul_ps(_mm512_cvtepi32_ps(d), ulp);
  const __mmask16 in_range = _mm512_cmpge_epi32_mask(ex, _mm512_set1_epi32(24)) &
                             _mm512_cmple_epi32_mask(ex, _mm512_set1_epi32(253));
  return _mm512_mask_cmp_ps_mask(in_range, e, room, _CMP_LT_OQ);
}

// Where certify_row_avx512 trusts certified16 and its own rounding of the round trip: fp16
// everywhere (certified16 excludes NaN); bf16 the normal range (outside it the slow path decides).
template <int DT>
__attribute__((target("arch=x86-64-v4"), always_inline)) static inline __mmask16 normal16(__m512 v) {
  if (DT == DT_F16) return (__mmask16)0xFFFF;
  const __m512i ex = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 23), _mm512_set1_epi32(0xFF));
  return _mm512_cmpge_epi32_mask(ex, _mm512_set1_epi32(24)) & _mm512_cmple_epi32_mask(ex, _mm512_set1_epi32(253));
}

// bound_from, 16 lanes: (ea + |v| 6e-8) (1 + 2^-20) + abs_bound, the same roundings.
__attribute__((target("arch=x86-64-v4"), always_inline)) static inline __m512 bound16(__m512 ea, __m512 v, __m512 ab) {
  const __m512 e = _mm512_add_ps(ea, _mm512_mul_ps(_mm512_abs_ps(v), _mm512_set1_ps(6.0e-8f)));
  return _mm512_add_ps(_mm512_fmadd_ps(e, _mm512_set1_ps(9.5367431640625e-07f), e), ab);
}

template <int DT>
__attribute__((target("arch=x86-64-v4"), always_inline)) static inline __m512 widen16(__m256i h) {
  if (DT == DT_F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int DT, bool RECORD>
__attribute__((target("arch=x86-64-v4"), noinline)) int32_t certify_row_avx512(const float *accq, const float *sq,
                                                                              float s32, float rni, const float *cbj,
                                                                              float abs_bound, uint16_t *wrow,
                                                                              uint32_t *wb, int32_t *flag, int nc) {
  const __m512 vs = _mm512_set1_ps(s32), vns = _mm512_set1_ps(-s32);
  const __m512 vks = _mm512_set1_ps(fabsf(s32) * 5.9611e-8f), vab = _mm512_set1_ps(abs_bound);
  const __m512 vrn = _mm512_set1_ps(rni);
  const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2);
  __m512i any = _mm512_setzero_si512();
  for (int j = 0; j < nc; j += 16) {
    const __mmask16 m = nc - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nc - j)) - 1u);
    const __m256i w16 = _mm256_maskz_loadu_epi16(m, wrow + j);
    _mm512_mask_storeu_epi32(wb + j, m, _mm512_cvtepu16_epi32(w16));
    const __m512 a = _mm512_load_ps(accq + j);
    const __m512 v = _mm512_fmadd_ps(vs, a, widen16<DT>(w16));
    const __m256i y = round16<DT>(v);
    // |acc| + 2 T + ||B_i|| ||A_j|| (rank_rows4_avx512_abs); |acc| covers s32 != s
    const __m512 t2 = _mm512_add_ps(_mm512_load_ps(sq + j), _mm512_load_ps(sq + j));
    const __m512 cs = _mm512_mul_ps(vrn, _mm512_maskz_loadu_ps(m, cbj + j));
    const __m512 ea = _mm512_mul_ps(vks, _mm512_add_ps(_mm512_add_ps(_mm512_abs_ps(a), t2), cs));
    __mmask16 ok = certified16<DT>(v, bound16(ea, v, vab));
    __mmask16 rec = 0;
    if (RECORD) {  // recorded unless the round trip is certified to give W back (see merge_tile)
      const __m512 v2 = _mm512_fmadd_ps(vns, a, widen16<DT>(y));
      const __mmask16 n2 = normal16<DT>(v2);  // outside: the slow path decides
      rec = _mm256_cmpneq_epi16_mask(round16<DT>(v2), w16) | (n2 & (__mmask16)~certified16<DT>(v2, bound16(ea, v2, vab)));
      ok &= n2;
    }
    _mm256_mask_storeu_epi16(wrow + j, m, y);
    const __m512i f = _mm512_or_si512(_mm512_maskz_mov_epi32(rec, one), _mm512_maskz_mov_epi32((__mmask16)~ok, two));
    _mm512_mask_storeu_epi32(flag + j, m, f);
    any = _mm512_or_si512(any, _mm512_maskz_mov_epi32(m, f));
  }
  return _mm512_reduce_or_epi32(any);
}
#endif

// Fetch the tile's rows of W (for writing) before its rank loop runs, in merge_impl's column-
// blocked order: a tile row is then a few cache lines with the next a row stride away, too short
// a run for the hardware prefetcher, and the epilogue's first load of each line missed to memory
// (a third of its time). The rank loop's arithmetic covers the latency.
template <typename T>
static inline void prefetch_tile(const T *w, int64_t ldw, int nr, int nc) {
  for (int q = 0; q < nr; ++q) {
    const char *p = (const char *)(w + q * ldw), *end = (const char *)(w + q * ldw + nc);
    for (; p < end; p += 64) __builtin_prefetch(p, 1, 3);
    __builtin_prefetch(end - 1, 1, 3);
  }
}

// The rank loop of one tile: acc[q][j] = the fp32 sum over k ascending from +0 of
// fmaf(B[i0 + q, k], A[k, j0 + j], .) -- the same fma sequence per element on every path (AVX-512,
// AVX2, portable), so the same bits whichever runs: the fast unmerge relies on it. The exception:
// the pair loop (g.ap16, rank_rows4_pairs), whose bits are its own; merge_impl chooses it from the
// factors and the CPU alone, so a merge and its fast unmerge on one machine agree. With `tight`
// (AVX-512, a 16-bit weight) also the partial-sum magnitudes into sabs; returns whether it did.
// Inlined into each clone of its callers.
template <int DT>
__attribute__((always_inline)) inline bool rank_tile(const Args &g, int64_t i0, int nr, int64_t j0, int nc,
                                                     float (*acc)[JT], [[maybe_unused]] float (*sabs)[JT],
                                                     [[maybe_unused]] bool tight) {
  const int64_t r = g.rank;
  if (nr != RB || !(g.ap || g.ap16)) {  // the portable loops accumulate into acc (the panel kernels store it)
    for (int q = 0; q < RB; ++q)
      for (int j = 0; j < JT; ++j) acc[q][j] = 0.0f;
  }
  if (nr == RB && (g.ap || g.ap16)) {
#ifdef LOWRANK_HAVE_AVX2_KERNEL
    if (g.ap16) {  // (16-bit weights only: pack_pairs)
      if (tight) {
        rank_rows4_pairs<true>(g.b16 + i0 * g.rp, g.rp, g.ap16 + j0 * g.rp, nc, acc, sabs);
        return true;
      }
      rank_rows4_pairs<false>(g.b16 + i0 * g.rp, g.rp, g.ap16 + j0 * g.rp, nc, acc, nullptr);
    } else if (tight && g_avx512 && DT != DT_F32) {
      rank_rows4_avx512_abs(g.b + i0 * r, r, g.ap + j0 * r, nc, acc, sabs);
      return true;
    } else if (g_avx512) {
      rank_rows4_avx512(g.b + i0 * r, r, g.ap + j0 * r, nc, acc);
    } else {
      rank_rows4_avx2(g.b + i0 * r, r, g.ap + j0 * r, nc, acc);
    }
#endif
  } else if (nr == RB) {
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
  return false;
}

// One tile: rows [i0, i0 + nr), columns [j0, j0 + nc). Appends row i0 + q's records to out[q].
// The epilogue works on 32-bit arrays (widen W, compute, narrow back) under `omp simd`: with the
// 16-bit loads and stores inside the same loop GCC 12 left it scalar (4x slower at 4096^2 bf16).
//
// The record rule (RECORD): an element is left out of the record only when both unmerges are
// known to give its original bits back: the certified one (the exact W' - s B A rounded once:
// lowrank's unmerge on every device) and the fast one (unmerge_tile_fast: the fp32 round trip of
// this very accumulation, uncertified, rounded over the whole finite range). For a merge
// certified on the fast path whose round trip v2 = W' - s32 * acc lies in the normal range: v2
// is certified and rounds to W (then round(v2) is both unmerges' result); an uncertified v2 is
// recorded outright, with no double evaluation of the check (that used to be redone in double:
// half of an exact merge's slow-path work). Merges on the slow path and round trips outside the
// normal range (zero and subnormal weights) go to the slow path, which leaves an element out
// only when the double round trip and the fast one (fast_trip_fails) both give W back. So the
// record is a superset of the elements whose exact round trip fails (every unmerge restores W
// with it), larger by the uncertified round trips that would have succeeded (~0.1-1%).
template <int DT, bool RECORD>
LOWRANK_CLONES
void merge_tile(const Args &g, int64_t i0, int nr, int64_t j0, int nc, std::vector<Rec> *out) {
  using T = typename Store<DT>::T;
  alignas(64) float acc[RB][JT];
  [[maybe_unused]] alignas(64) float sabs[RB][JT];  // with the tight bound: T (rank_rows4_avx512_abs)
  alignas(64) uint32_t wb[JT], yb[JT];
  alignas(64) int32_t flag[JT];  // bit 0: needs a record, bit 1: needs the slow path
  for (int j = nc; j < JT; ++j) flag[j] = 0;  // read (then masked off) by flag_masks
  const float s32 = (float)g.scale;
  const int64_t r = g.rank;
  if (g.prefetch) prefetch_tile((const T *)g.w + i0 * g.ldw + j0, g.ldw, nr, nc);
  [[maybe_unused]] const bool tight = rank_tile<DT>(g, i0, nr, j0, nc, acc, sabs, true);
  for (int q = 0; q < nr; ++q) {
    const int64_t i = i0 + q;
    T *wrow = (T *)g.w + i * g.ldw + j0;
    const float rbi = g.rb[i];
    const float *cbj = g.cb + j0;
    const float *accq = acc[q];
    const float abs_bound = g.abs_bound;
    int32_t any = 0;
    bool direct = false;  // W's row written by the epilogue (else from yb below)
#ifdef LOWRANK_HAVE_AVX2_KERNEL
    if constexpr (DT != DT_F32) {
      if (tight) {
        any = certify_row_avx512<DT, RECORD>(accq, sabs[q], s32, rbi * g.inv_c, cbj, abs_bound, (uint16_t *)wrow,
                                             wb, flag, nc);
        direct = true;
      }
    }
#endif
    if (!direct) {
      for (int j = 0; j < nc; ++j) wb[j] = wrow[j];
      any = certify_row<DT, RECORD>(accq, s32, rbi, cbj, abs_bound, wb, yb, flag, nc);
    }
    if (any & 2) {
      // Redo in double: ~0.1% of elements for bf16 at r = 16, but ~4.5% for fp16 at r = 64 (the
      // bound grows with r; fp16 midpoints are 8x denser), doubled in exact mode by the round
      // trip's check. The flagged elements' sums run side by side (k outer), so one element's r
      // dependent adds do not serialize. Per element the sum is still +0 + p_0 + ... + p_{r-1}
      // in that order (products of floats exact in double), as in the pure-torch fallback.
      int js[JT];
      double dacc[JT];
      int m = 0;
      uint64_t mk[JT / 64];
      flag_masks<1>(flag, nc, mk);
      for (int w = 0; w < JT / 64; ++w)
        for (uint64_t x = mk[w]; x; x &= x - 1) js[m++] = w * 64 + __builtin_ctzll(x);
      const float *bi = g.b + i * r;
      // (Gathering 8 elements' A values per k with AVX2 was 1.4x slower on AMD Zen 4.)
      for (int e = 0; e < m; ++e) dacc[e] = 0.0;
      if (g.ap16) {  // the same from the pair loop's panels: a[k] is half k & 1 of word k / 2
        int off[JT];
        for (int e = 0; e < m; ++e) off[e] = (js[e] >> 4) * 16 * (int)g.rp + (js[e] & 15);
        const uint32_t *apt = g.ap16 + j0 * g.rp;
        for (int64_t k = 0; k < r; ++k) {
          const double bk = (double)bi[k];
          const uint32_t *ak = apt + 16 * (k >> 1);
          const int sh = (k & 1) ? 0 : 16;  // the value's bits: the high half as it is, the low one shifted up
          for (int e = 0; e < m; ++e) dacc[e] += bk * (double)u2f((ak[off[e]] << sh) & 0xFFFF0000u);
        }
      } else if (g.ap) {
        // A from the panels the rank loop has just read (in cache; an element's r values 64 bytes
        // apart, one run of lines) rather than from a's rows (r lines cols * 4 bytes apart): at
        // fp16 r = 64, a delta of 30% of W's rms, this loop was 40% of an unmerge.
        int off[JT];
        for (int e = 0; e < m; ++e) off[e] = (js[e] >> 4) * 16 * (int)r + (js[e] & 15);
        const float *apt = g.ap + j0 * r;
        for (int64_t k = 0; k < r; ++k) {
          const double bk = (double)bi[k];
          const float *ak = apt + 16 * k;
          for (int e = 0; e < m; ++e) dacc[e] += bk * (double)ak[off[e]];
        }
      } else {
        for (int64_t k = 0; k < r; ++k) {
          const double bk = (double)bi[k];
          const float *ak = g.a + k * g.cols + j0;
          for (int e = 0; e < m; ++e) dacc[e] += bk * (double)ak[js[e]];
        }
      }
      for (int e = 0; e < m; ++e) {
        const int j = js[e];
        const uint32_t y = slow_element<DT>(wb[j], g.scale, dacc[e]);
        flag[j] = RECORD ? (int32_t)(slow_element<DT>(y, -g.scale, dacc[e]) != wb[j]) |
                               fast_trip_fails<DT>(y, accq[j], s32, wb[j])
                         : 0;
        if (direct)
          wrow[j] = (T)y;
        else
          yb[j] = y;
        any |= flag[j];
      }
    }
    if (!direct)
      for (int j = 0; j < nc; ++j) wrow[j] = (T)yb[j];
    if (RECORD && (any & 1)) {
      append_records(flag, nc, wb, (int32_t)(i * g.cols + j0), out[q]);
    }
  }
}

#ifdef LOWRANK_HAVE_AVX2_KERNEL
// unmerge_tile_fast's row for a 16-bit weight, 16 elements per step: W <- round(W + s32 * acc)
// with the conversion instructions (as certify_row_avx512 rounds the round trip it checks).
template <int DT>
__attribute__((target("arch=x86-64-v4"), noinline)) void fast_row_avx512(const float *accq, float s32, uint16_t *wrow,
                                                                        int nc) {
  const __m512 vs = _mm512_set1_ps(s32);
  for (int j = 0; j < nc; j += 16) {
    const __mmask16 m = nc - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nc - j)) - 1u);
    const __m256i w16 = _mm256_maskz_loadu_epi16(m, wrow + j);
    const __m512 v = _mm512_fmadd_ps(vs, _mm512_load_ps(accq + j), widen16<DT>(w16));
    _mm256_mask_storeu_epi16(wrow + j, m, round16<DT>(v));
  }
}
#endif

// The fast unmerge of one tile (g.scale = -the merge's): W <- round(W + s32 * acc), acc from
// rank_tile (the merge's own bits), with no bound, certification, slow path or record. Exact only
// together with the record of an exact merge by this library with the same factors and scale:
// by the record rule (merge_tile) every element this gets wrong is one the record writes back.
// At fp16 r = 64 the certified unmerge's bound tracking doubles the rank loop's FP work and its
// slow path redoes ~1% of the elements in double; this does neither.
template <int DT>
LOWRANK_CLONES
void unmerge_tile_fast(const Args &g, int64_t i0, int nr, int64_t j0, int nc) {
  using T = typename Store<DT>::T;
  alignas(64) float acc[RB][JT];
  alignas(64) uint32_t wb[JT];
  const float s32 = (float)g.scale;
  if (g.prefetch) prefetch_tile((const T *)g.w + i0 * g.ldw + j0, g.ldw, nr, nc);
  rank_tile<DT>(g, i0, nr, j0, nc, acc, nullptr, false);
  for (int q = 0; q < nr; ++q) {
    T *wrow = (T *)g.w + (i0 + q) * g.ldw + j0;
    const float *accq = acc[q];
#ifdef LOWRANK_HAVE_AVX2_KERNEL
    if constexpr (DT != DT_F32) {
      if (g_avx512) {
        fast_row_avx512<DT>(accq, s32, (uint16_t *)wrow, nc);
        continue;
      }
    }
#endif
    for (int j = 0; j < nc; ++j) wb[j] = wrow[j];
#pragma omp simd
    for (int j = 0; j < nc; ++j) wb[j] = round_full<DT>(fmaf(s32, accq[j], to_float<DT>(wb[j])));
    for (int j = 0; j < nc; ++j) wrow[j] = (T)wb[j];
  }
}

#ifdef LOWRANK_HAVE_AVX2_KERNEL
// The slow path's rounding for 8 elements at once (AVX-512): v = w + s * acc in double (two
// roundings, as slow_element), round-to-odd to float (an inexact result with an even last bit
// steps one ulp toward v: bits + 1 when |v| > |f|, else - 1; NaN passes), then nearest-even to
// the 16-bit target with the conversion instructions, NaN made the canonical quiet NaN of
// float_to_half_full / float_to_bf16_full. Returns the 8 results in the low 16 bits of each lane.
template <int DT>
__attribute__((target("arch=x86-64-v4"))) static inline __m256i round_slow8(__m512d w, double s, __m512d acc) {
  const __m512d v = _mm512_add_pd(w, _mm512_mul_pd(_mm512_set1_pd(s), acc));
  const __m256 f = _mm512_cvtpd_ps(v);
  const __m512d back = _mm512_cvtps_pd(f);
  const __mmask8 ordered = _mm512_cmp_pd_mask(v, v, _CMP_ORD_Q);
  const __mmask8 inexact = _mm512_cmp_pd_mask(back, v, _CMP_NEQ_OQ) & ordered;
  __m256i u = _mm256_castps_si256(f);
  const __mmask8 even = _mm256_testn_epi32_mask(u, _mm256_set1_epi32(1));
  const __m512d absmask = _mm512_castsi512_pd(_mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll));
  const __mmask8 up = _mm512_cmp_pd_mask(_mm512_and_pd(v, absmask), _mm512_and_pd(back, absmask), _CMP_GT_OQ);
  const __mmask8 step = inexact & even;
  u = _mm256_mask_add_epi32(u, step & up, u, _mm256_set1_epi32(1));
  u = _mm256_mask_sub_epi32(u, step & (__mmask8)~up, u, _mm256_set1_epi32(1));
  const __mmask8 nan = (__mmask8)~ordered;
  if (DT == DT_F16) {
    __m256i h = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(_mm256_castsi256_ps(u), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i qnan = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
                                         _mm256_set1_epi32(0x7E00));
    return _mm256_mask_mov_epi32(h, nan, qnan);
  } else {
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i rne = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(hi, _mm256_set1_epi32(1)))), 16);
    return _mm256_mask_mov_epi32(rne, nan, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)));
  }
}

// 8 stored 16-bit values (low halves of the lanes) widened exactly to double.
template <int DT>
__attribute__((target("arch=x86-64-v4"))) static inline __m512d widen8(__m256i bits) {
  if (DT == DT_F16) return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm256_cvtepi32_epi16(bits)));
  return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)));
}

// The f64 path for 16-bit weights, one RB-row tile: every element takes the slow path's
// arithmetic (the sum in double, w + s * sum, one correct rounding to the target), computed for
// all of them with the double rank loop instead of element by element. No certification, so its
// cost does not grow with the delta (at fp16 and r = 64 the fp32 fast path sends 5-10% of the
// elements to the scalar slow path, twice in exact mode); the bits are the slow path's, which
// are the fast path's wherever that one certifies (merge_math.h), and the pure-torch fallback's.
template <int DT, bool RECORD>
__attribute__((target("arch=x86-64-v4"), noinline)) void merge_tile_f64(const Args &g, int64_t i0, int64_t j0, int nc,
                                                                        std::vector<Rec> *out) {
  using T = typename Store<DT>::T;
  alignas(64) double acc[RB][JT];
  alignas(64) uint32_t wb[JT], yb[JT];
  alignas(64) int32_t flag[JT];
  for (int j = nc; j < JT; ++j) flag[j] = 0;
  const int64_t r = g.rank;
  if (g.prefetch) prefetch_tile((const T *)g.w + i0 * g.ldw + j0, g.ldw, RB, nc);
  rank_rows4_avx512_f64(g.b + i0 * r, r, g.ap + j0 * r, nc, acc);
  // the record rule (merge_tile) also asks whether the fast unmerge's fp32 round trip gives W back
  [[maybe_unused]] alignas(64) float acc32[RB][JT];
  if (RECORD) {  // (the fast unmerge's loop: rank_tile's)
    if (g.ap16)
      rank_rows4_pairs<false>(g.b16 + i0 * g.rp, g.rp, g.ap16 + j0 * g.rp, nc, acc32, nullptr);
    else
      rank_rows4_avx512(g.b + i0 * r, r, g.ap + j0 * r, nc, acc32);
  }
  const float s32 = (float)g.scale;
  const double s = g.scale, ns = -g.scale;
  for (int q = 0; q < RB; ++q) {
    const int64_t i = i0 + q;
    T *wrow = (T *)g.w + i * g.ldw + j0;
    const double *accq = acc[q];
    for (int j = 0; j < nc; ++j) wb[j] = wrow[j];
    int32_t any = 0;
    int j = 0;
    for (; j + 8 <= nc; j += 8) {
      const __m256i wv = _mm256_load_si256((const __m256i *)(wb + j));
      const __m512d a8 = _mm512_loadu_pd(accq + j);
      const __m256i y = round_slow8<DT>(widen8<DT>(wv), s, a8);
      _mm256_store_si256((__m256i *)(yb + j), y);
      if (RECORD) {
        const __m256i back = round_slow8<DT>(widen8<DT>(y), ns, a8);
        const __m256i f = _mm256_srli_epi32(_mm256_xor_si256(_mm256_cmpeq_epi32(back, wv), _mm256_set1_epi32(-1)), 31);
        _mm256_store_si256((__m256i *)(flag + j), f);
      }
    }
    for (; j < nc; ++j) {  // the tail: the slow path's own scalar code, the same bits
      const uint32_t y = slow_element<DT>(wb[j], s, accq[j]);
      yb[j] = y;
      if (RECORD) flag[j] = (int32_t)(slow_element<DT>(y, ns, accq[j]) != wb[j]);
    }
    if (RECORD) {
      for (int jj = 0; jj < nc; ++jj) flag[jj] |= fast_trip_fails<DT>(yb[jj], acc32[q][jj], s32, wb[jj]);
      for (int jj = 0; jj < nc; ++jj) any |= flag[jj];
    }
    for (int j = 0; j < nc; ++j) wrow[j] = (T)yb[j];
    if (RECORD && any) {
      append_records(flag, nc, wb, (int32_t)(i * g.cols + j0), out[q]);
    }
  }
}
#endif

// a (rank x cols, row-major) -> 16-column panels for rank_rows4_avx2; empty when that kernel
// is not used (no AVX2 + FMA, or fewer than RB rows).
// Uninitialized float storage (a std::vector would zero it first: a wasted pass, ~3% of a fast
// unmerge at 1024x4096 r = 64, over buffers that are then written in full). Throws bad_alloc.
using FloatBuf = std::unique_ptr<float[]>;
static FloatBuf float_buf(int64_t n) { return FloatBuf(new float[(size_t)std::max<int64_t>(n, 1)]); }

static FloatBuf pack_panels(const Args &g) {
  if (!g_avx2_fma || g.rows < RB) return nullptr;
  const int64_t panels = (g.cols + 15) / 16, r = g.rank;
  FloatBuf ap = float_buf(panels * r * 16);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t k = 0; k < r; ++k) {
      float *dst = ap.get() + (p * r + k) * 16;
      for (int c = 0; c < 16; ++c) dst[c] = 16 * p + c < g.cols ? g.a[k * g.cols + 16 * p + c] : 0.0f;
    }
  }
  return ap;
}

// The pair loop's operands (Args::ap16, b16), or nulls when it does not apply: a 32-bit weight
// (whose merge is not certified: its bits stay the fp32 loop's), no AVX512_BF16, fewer than RB rows,
// or a factor value that is not a normal bf16 number or zero (subnormal, or more than 8
// significant bits: fp32-trained factors). A bf16 adapter (saved in bf16, or trained in it) passes
// as it is or widened to fp32. The check reads A and B once (r (rows + cols) floats).
using WordBuf = std::unique_ptr<uint32_t[]>;
static inline bool bf16_exact(uint32_t u) {
  const uint32_t ex = u & 0x7F800000u;
  return (u & 0xFFFFu) == 0 && ex != 0x7F800000u && (ex != 0 || (u & 0x7FFFFFFFu) == 0);
}
static bool pack_pairs(const Args &g, int dt, WordBuf &ap16, WordBuf &b16) {
  if (dt == DT_F32 || !g_bf16_dot || g.rows < RB) return false;
  const int64_t r = g.rank, rp = (r + 1) / 2, cols = g.cols, panels = (cols + 15) / 16;
  // B first: fp32-trained factors usually fail on its first row (a new adapter's B = 0 passes)
  uint32_t ok = 1;
  for (int64_t i = 0; i < g.rows && ok; ++i)
    for (int64_t k = 0; k < r; ++k) ok &= (uint32_t)bf16_exact(f2u(g.b[i * r + k]));
  for (int64_t k = 0; k < r && ok; ++k)
    for (int64_t j = 0; j < cols; ++j) ok &= (uint32_t)bf16_exact(f2u(g.a[k * cols + j]));
  if (!ok) return false;
  ap16.reset(new uint32_t[(size_t)(panels * rp * 16)]);
  b16.reset(new uint32_t[(size_t)(g.rows * rp)]);
  const int64_t full = cols / 16;  // panels with 16 columns
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t kk = 0; kk < rp; ++kk) {
      const float *lo = g.a + 2 * kk * cols;
      const float *hi = 2 * kk + 1 < r ? lo + cols : nullptr;
      for (int64_t p = 0; p < panels; ++p) {
        uint32_t *dst = ap16.get() + (p * rp + kk) * 16;
        const int64_t n = p < full ? 16 : cols - 16 * p;
        for (int64_t c = 0; c < n; ++c)
          dst[c] = f2u(lo[16 * p + c]) >> 16 | (hi ? f2u(hi[16 * p + c]) & 0xFFFF0000u : 0u);
        for (int64_t c = n; c < 16; ++c) dst[c] = 0;
      }
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < g.rows; ++i) {
      const float *row = g.b + i * r;
      for (int64_t kk = 0; kk < rp; ++kk)
        b16[i * rp + kk] = f2u(row[2 * kk]) >> 16 | (2 * kk + 1 < r ? f2u(row[2 * kk + 1]) & 0xFFFF0000u : 0u);
    }
  }
  return true;
}

// Which path a 16-bit merge takes: the f64 one (merge_tile_f64) needs AVX-512 and the panels,
// and is taken only when LOWRANK_MERGE_F64=1 (tests, benchmarks; =0 or unset: the fast path).
// It used to be the default for exact fp16 merges at rank >= 32; with the AVX-512 epilogue and
// the slow path reading the panels, the fast path is faster everywhere measured (one thread,
// 1024 x 4096, merge + exact unmerge, min of 9: fp16 r = 64 40.5 / 46.2 ms on the fast path
// against 47.1 / 48.7 ms on the f64 path at a delta of 5% / 30% of W's rms; bf16 and r = 16
// by more).
static bool f64_requested(int dt) {
  if (dt == DT_F32 || !g_avx512) return false;
  const char *env = std::getenv("LOWRANK_MERGE_F64");
  return env != nullptr && env[0] == '1';
}
static bool use_f64_path(const Args &g, int dt) { return g.ap != nullptr && f64_requested(dt); }

// The fast unmerge's record written back as it goes (Args::put_idx): after a tile's rounding,
// each of its rows' records in columns below j0 + nc, while the tile's lines are still in L1.
// cur[q]: row i0 + q's next record (its first at or after the row's start, set per task by
// row_cursors), so with a row's tiles visited in column order (merge_impl) every record is
// written once, after its element's rounding: the bits of the rounding pass followed by
// restore_run. (As a second pass over W, restore_dispatch, it was 9% of the library's time in a
// fp16 r = 16 round trip at 1024 x 4096 with 4.6% of the elements recorded: a miss per line.)
template <typename T>
static inline void put_tile_records(const Args &g, int64_t i0, int nr, int64_t j0, int nc, int64_t *cur) {
  const int32_t *idx = g.put_idx;
  const T *val = (const T *)g.put_val;
  for (int q = 0; q < nr; ++q) {
    const int64_t start = (i0 + q) * g.cols, end = start + j0 + nc;
    T *wrow = (T *)g.w + (i0 + q) * g.ldw;
    int64_t n = cur[q];
    for (; n < g.put_count && idx[n] < end; ++n) wrow[idx[n] - start] = val[n];
    cur[q] = n;
  }
}

// cur[q] = the first record at or after row r0 + q's start (q < rn), by binary search.
static void row_cursors(const Args &g, int64_t r0, int rn, int64_t *cur) {
  const int32_t *idx = g.put_idx;
  for (int q = 0; q < rn; ++q) {
    const int64_t start = (r0 + q) * g.cols;
    cur[q] = std::lower_bound(idx, idx + g.put_count, start, [](int32_t x, int64_t v) { return x < v; }) - idx;
  }
}

template <int DT>
static int merge_impl(const Args &g_in, int32_t *rec_idx, void *rec_val, int64_t cap, int64_t *count) {
  using T = typename Store<DT>::T;
  Args g = g_in;
  {
    // inv_c (Args): 1 / c0 rounded up with a 2^-19 margin for the float products rb * inv_c * cb
    const double u = 5.9604644775390625e-08, r = (double)g.rank;
    const double c0 = fabs(g.scale) * (r * u / (1.0 - r * u) * (1.0 + u) + u);
    if (c0 > 0.0) {
      const double x = (1.0 / c0) * (1.0 + 1.9073486328125e-06);
      float f = (float)x;
      if ((double)f < x) f = nextafterf(f, INFINITY);
      g.inv_c = std::min(f, 3.4028234663852886e38f);  // (finite: see merge_strided's slack for |scale| < 2^-100)
    }
  }
  // A's panels: the pair loop's when it applies (pack_pairs), else (or for the f64 path, which
  // reads fp32 panels) the fp32 loop's; an undo's call (below) comes with them.
  FloatBuf panels;
  WordBuf ap16, b16;
  if (!g.ap && !g.ap16) {
    try {
      if (pack_pairs(g, DT, ap16, b16)) {
        g.ap16 = ap16.get();
        g.b16 = b16.get();
        g.rp = (g.rank + 1) / 2;
        // the pair loop's flushes to zero: at most 2^-126 per fused step (r in all), times
        // |scale|: merge_strided's underflow slack covers it already, a direct lowrank_cpu_merge
        // caller's need not
        const double flush = 1.1754943508222875e-38 * (double)g.rank * fabs(g.scale) * 1.01;
        const float ab = (float)((double)g.abs_bound + flush);
        g.abs_bound = (double)ab < (double)g.abs_bound + flush ? nextafterf(ab, INFINITY) : ab;
      }
      if (!g.ap16 || f64_requested(DT)) {
        panels = pack_panels(g);
        g.ap = panels.get();
      }
    } catch (const std::bad_alloc &) {
      return LOWRANK_ERR_OUT_OF_MEMORY;
    }
  }
  // The static schedule gives thread t one contiguous run of tasks (below), in thread order. Records go straight into the caller's buffers:
  // thread t writes its rows' records, in index order, from slot cap * t / nthreads on (what
  // does not fit its share goes to a heap spill), and the shares are then slid together. (The
  // first version appended to growing per-thread vectors and copied them out serially: with
  // their page faults that was half the time of an exact merge at 1024x4096.)
  const bool f64 = use_f64_path(g, DT);
  // A task is RT rows (a multiple of RB) over all columns. When A's panels outgrow L1 (over
  // 32 KiB: r = 16 above 512 columns), the task visits them one column block at a time, so
  // that the block's panels (jb x r floats, at most 32 KiB) stay in L1 while each RB-row tile of
  // the task reads them (tasks of RB rows over all columns streamed all of A from L2 for every RB
  // rows), and each tile's W rows are prefetched (a tile row is then too short a run for the
  // hardware prefetcher). A in L1 anyway: the whole row, JT columns at a time, as W lies in
  // memory. (The bound was L2's share, 512 KiB, when blocking cost 15% at r = 16, before the
  // prefetch; with it, blocking r = 16 / 32 makes a merge + fast unmerge take 0.89-0.94x the
  // time at 1024 x 4096 (2 threads) and 0.86-0.92x at 4096 x 4096 / 4096 x 1024, the unmerge's
  // rank loop gaining the most: a 1-thread copy of the AVX-512 loop ran 1.94 ms with A streamed
  // from L2 against 1.17 ms from L1 at 1024 x 4096 r = 16.) A row's records still come out in
  // column order (its column blocks are visited in order), collected per row and handed out row
  // by row.
  // (The pair loop's panels hold a column in ceil(r / 2) words: twice the columns per block.)
  const int64_t words = g.ap16 && !f64 ? g.rp : g.rank;  // 4-byte words of the panels per column
  const bool blocked = (g.ap || g.ap16) && words * g.cols * (int64_t)sizeof(float) > (int64_t)(32 << 10);
  const int64_t jb = blocked ? std::min<int64_t>(JT, std::max<int64_t>(32, (8192 / words) / 32 * 32)) : g.cols;
  g.prefetch = blocked;
  const int maxthr = std::max(1, omp_get_max_threads());
  const int64_t rt = g.rt ? g.rt : std::max<int64_t>(RB, std::min<int64_t>(RT, (g.rows / (4 * maxthr)) / RB * RB));
  const int64_t tasks = (g.rows + rt - 1) / rt;
  const int nthreads = (int)std::max<int64_t>(1, std::min<int64_t>(maxthr, tasks));
  // One task's tiles: RB-row tiles over each column block in turn (one block: the whole row).
  auto run_task = [&](const Args &ga, int64_t t, std::vector<Rec> *outs) {
    const int64_t r0 = t * rt;
    const int rn = (int)std::min<int64_t>(rt, ga.rows - r0);
    int64_t cur[RT];  // with ga.put_idx: each row's next record (put_tile_records)
    if (ga.fast && ga.put_idx) row_cursors(ga, r0, rn, cur);
    for (int64_t jb0 = 0; jb0 < ga.cols; jb0 += jb) {
      const int64_t jb1 = std::min(ga.cols, jb0 + jb);
      for (int q0 = 0; q0 < rn; q0 += RB) {
        for (int64_t j0 = jb0; j0 < jb1; j0 += JT) {
          const int nc = (int)std::min<int64_t>(JT, jb1 - j0);
          const int64_t i0 = r0 + q0;
          const int nr = std::min(RB, rn - q0);
          if (ga.fast) {
            unmerge_tile_fast<DT>(ga, i0, nr, j0, nc);
            if (ga.put_idx) put_tile_records<T>(ga, i0, nr, j0, nc, cur + q0);
            continue;
          }
#ifdef LOWRANK_HAVE_AVX2_KERNEL
          if constexpr (DT != DT_F32) {
            if (f64 && nr == RB) {
              if (ga.record)
                merge_tile_f64<DT, true>(ga, i0, j0, nc, outs + q0);
              else
                merge_tile_f64<DT, false>(ga, i0, j0, nc, outs + q0);
              continue;
            }
          }
#endif
          if (ga.record)
            merge_tile<DT, true>(ga, i0, nr, j0, nc, outs + q0);
          else
            merge_tile<DT, false>(ga, i0, nr, j0, nc, outs + q0);
        }
      }
    }
  };
  if (!g.record) {  // no allocation from here on: an undo (below) runs this way
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < tasks; ++t)
      if (!g.only || g.only[t]) run_task(g, t, nullptr);
    return LOWRANK_OK;
  }
  // With a record, a failed allocation must leave W as it was. Each row's record list is reserved
  // to a full row before the task writes W (merge_tile then appends without allocating), so only
  // a spill push, after the task's W rows are merged, can still fail: that task is then unmerged
  // and restored from its lists at once, and `done` tells the final undo which tasks to reverse.
  // LOWRANK_TEST_OOM_AFTER=n (tests) makes the n-th of these allocations (0-based) fail.
  std::vector<int64_t> lo, got;
  std::vector<std::vector<Rec>> spill;
  std::vector<uint8_t> done;
  try {
    lo.resize(nthreads + 1);
    got.assign(nthreads, 0);
    spill.resize(nthreads);
    done.assign(tasks, 0);
  } catch (const std::bad_alloc &) {
    return LOWRANK_ERR_OUT_OF_MEMORY;
  }
  for (int t = 0; t <= nthreads; ++t) lo[t] = cap * t / nthreads;
  const char *fail_env = std::getenv("LOWRANK_TEST_OOM_AFTER");
  const long fail_at = fail_env ? std::atol(fail_env) : -1;
  long allocs = 0;
  auto may_fail = [&]() {
    if (fail_at < 0) return;
    long k;
#pragma omp atomic capture
    k = allocs++;
    if (k == fail_at) throw std::bad_alloc();
  };
  T *vals = (T *)rec_val;
  bool oom = false;
#pragma omp parallel num_threads(nthreads)
  {
    const int me = omp_get_thread_num();
    std::vector<Rec> rows_out[RT];
    int64_t n = 0;  // records found by this thread
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int rn = (int)std::min<int64_t>(rt, g.rows - t * rt);
      const int64_t n0 = n;
      const size_t spilled0 = spill[me].size();
      bool wrote = false;
      try {
        for (int q = 0; q < rn; ++q) {
          may_fail();
          rows_out[q].reserve((size_t)g.cols);
        }
        wrote = true;
        run_task(g, t, rows_out);
        const int64_t room = lo[me + 1] - lo[me];
        for (int q = 0; q < rn; ++q) {
          const Rec *src = rows_out[q].data();
          const int64_t m = (int64_t)rows_out[q].size();
          const int64_t fit = std::max<int64_t>(0, std::min(m, room - n));  // into this thread's share
          for (int64_t e = 0; e < fit; ++e) {  // (slots lo[me] + n .. : inside the share)
            rec_idx[lo[me] + n + e] = src[e].idx;
            vals[lo[me] + n + e] = (T)src[e].bits;
          }
          for (int64_t e = fit; e < m; ++e) {  // the rest to the spill
            may_fail();
            spill[me].push_back(src[e]);
          }
          n += m;
        }
        done[t] = 1;
      } catch (const std::bad_alloc &) {
        if (wrote) {  // this task's rows are merged, its records whole in rows_out: reverse it
          n = n0;
          spill[me].resize(spilled0);  // (shrinking: no allocation)
          Args back = g;
          back.scale = -g.scale;
          back.record = false;
          run_task(back, t, nullptr);
          for (int q = 0; q < rn; ++q)
            for (const Rec &rc : rows_out[q]) ((T *)g.w)[(rc.idx / g.cols) * g.ldw + rc.idx % g.cols] = (T)rc.bits;
        }
#pragma omp atomic write
        oom = true;
      }
      for (int q = 0; q < rn; ++q) rows_out[q].clear();
    }
    got[me] = n;
  }
  int64_t total = 0;
  bool spilled = false;
  for (int t = 0; t < nthreads; ++t) {
    total += got[t];
    spilled |= !spill[t].empty();
  }
  *count = total;
  // All records, in index order, whatever their place: the share in the buffer, then the spill.
  auto for_each_record = [&](auto &&fn) {
    for (int t = 0; t < nthreads; ++t) {
      const int64_t in_buf = std::min(got[t], lo[t + 1] - lo[t]);
      for (int64_t n = 0; n < in_buf; ++n) fn(rec_idx[lo[t] + n], (uint32_t)vals[lo[t] + n]);
      for (const Rec &rc : spill[t]) fn(rc.idx, rc.bits);
    }
  };
  auto undo = [&](int status) {
    // The unmerge restores every element not in the record by construction, and the record
    // (complete for the tasks merged, only maybe too large for the caller's buffer) the rest.
    Args back = g;
    back.scale = -g.scale;
    back.record = false;
    back.rt = rt;
    back.only = done.data();  // the tasks merged (a task that failed was reversed on the spot)
    merge_impl<DT>(back, nullptr, nullptr, 0, nullptr);
    for_each_record([&](int32_t idx, uint32_t bits) { ((T *)g.w)[(idx / g.cols) * g.ldw + idx % g.cols] = (T)bits; });
    return status;
  };
  if (oom) return undo(LOWRANK_ERR_OUT_OF_MEMORY);
  if (total > cap) return undo(LOWRANK_ERR_CAPACITY);
  if (!spilled) {  // slide the shares down: each destination starts at or below its source
    int64_t dst = 0;
    for (int t = 0; t < nthreads; ++t) {
      if (dst != lo[t] && got[t] > 0) {
        memmove(rec_idx + dst, rec_idx + lo[t], (size_t)got[t] * sizeof(int32_t));
        memmove(vals + dst, vals + lo[t], (size_t)got[t] * sizeof(T));
      }
      dst += got[t];
    }
    return LOWRANK_OK;
  }
  // A share overflowed (records far from evenly spread over the rows): gather, then write out.
  std::vector<Rec> all;
  try {
    all.reserve((size_t)total);
  } catch (const std::bad_alloc &) {
    return undo(LOWRANK_ERR_OUT_OF_MEMORY);
  }
  for_each_record([&](int32_t idx, uint32_t bits) { all.push_back(Rec{idx, bits}); });
  for (int64_t n = 0; n < total; ++n) {
    rec_idx[n] = all[(size_t)n].idx;
    vals[n] = (T)all[(size_t)n].bits;
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

// Factor element `off` (an element index: row-major via the caller's strides) widened to float,
// exact for all three dtypes; FDT a template parameter so that the widening loops below vectorize.
template <int FDT>
static inline float load_factor(const void *p, int64_t off) {
  if (FDT == DT_F32) return ((const float *)p)[off];
  if (FDT == DT_F16) return half_to_float(((const uint16_t *)p)[off]);
  return bf16_to_float(((const uint16_t *)p)[off]);
}

// The unit-stride runs of the factor widening (merge_strided), cloned like merge_tile. Inside
// merge_strided's parallel region they were compiled for the x86-64-v2 baseline only (4 lanes;
// merge_strided was 3.6-4.4% of an exact fp16 merge + unmerge at 1024x4096 r = 64 in `perf`, one or
// two threads, fp16 factors); the v3 / v4 clones run them 8 / 16 lanes wide. widen_run:
// dst[k] = p[base + k] widened (k < n), returns the sum of their squares in double.
// widen_run_cols: the same into dst, each square added to ss[j].
template <int FDT>
LOWRANK_CLONES static double widen_run(const void *p, int64_t base, int64_t n, float *dst) {
  double ss = 0.0;
#pragma omp simd reduction(+ : ss)
  for (int64_t k = 0; k < n; ++k) {
    const float x = load_factor<FDT>(p, base + k);
    dst[k] = x;
    ss += (double)x * x;
  }
  return ss;
}

template <int FDT>
LOWRANK_CLONES static void widen_run_cols(const void *p, int64_t base, int64_t n, float *dst, double *ss) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float x = load_factor<FDT>(p, base + j);
    dst[j] = x;
    ss[j] += (double)x * x;
  }
}

static inline float round_up_float(double x) {
  float f = (float)x;
  return (double)f < x ? nextafterf(f, INFINITY) : f;
}

static int merge_strided(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype, const void *b, int64_t b_s0,
                         int64_t b_s1, const void *a, int64_t a_s0, int64_t a_s1, int factor_dtype, int64_t rank,
                         double scale, int32_t *rec_idx, void *rec_val, int64_t rec_capacity, int64_t *rec_count,
                         bool fast, const int32_t *put_idx = nullptr, const void *put_val = nullptr,
                         int64_t put_count = 0) {
  if (rows < 0 || cols < 0 || rank < 1 || rank > 256) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (factor_dtype < LOWRANK_DTYPE_FLOAT32 || factor_dtype > LOWRANK_DTYPE_BFLOAT16) return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  if (rows == 0 || cols == 0) {
    if (rec_count) *rec_count = 0;
    return LOWRANK_OK;
  }
  if (!b || !a || !isfinite(scale)) return LOWRANK_ERR_INVALID_ARGUMENT;
  FloatBuf b32, a32, rb, cb;  // each written in full below
  try {
    b32 = float_buf(rows * rank);
    a32 = float_buf(rank * cols);
    rb = float_buf(rows);
    cb = float_buf(cols);
  } catch (const std::bad_alloc &) {
    return LOWRANK_ERR_OUT_OF_MEMORY;
  }
  // The bounds of merge_math.h, from norms summed in double.
  const double u = 5.9604644775390625e-08, r = (double)rank;
  const double gamma = r * u / (1.0 - r * u);
  const double c = fabs(scale) * (gamma * (1.0 + u) + u) * (1.0 + 3.814697265625e-06);
  // (Threaded: serial, the widening and norms were 3% of a merge + unmerge at 1024x4096 r=64. One
  // parallel region for both loops: on a loaded machine every extra barrier can cost a time slice.
  // Templated on the factor dtype, with the unit-stride case apart, so that the loops vectorize:
  // with a per-element dtype switch they were 7% of an exact merge + unmerge at 1024x4096 r=64.)
  int finite = 1;
  double b_max = 0.0;  // max_i ||b[i, :]|| (for a scale below float's normal range: below)
  auto widen = [&](auto fdt) {
    constexpr int FDT = decltype(fdt)::value;
    constexpr int64_t CB = 256;  // columns per block: each thread reads a's rows in runs
#pragma omp parallel reduction(& : finite) reduction(max : b_max)
    {
#pragma omp for schedule(static) nowait
      for (int64_t i = 0; i < rows; ++i) {
        double ss = 0.0;
        float *dst = b32.get() + i * rank;
        if (b_s1 == 1) {
          ss = widen_run<FDT>(b, i * b_s0, rank, dst);
        } else {
          for (int64_t k = 0; k < rank; ++k) {
            const float x = load_factor<FDT>(b, i * b_s0 + k * b_s1);
            dst[k] = x;
            ss += (double)x * x;
          }
        }
        finite &= isfinite(ss) != 0;
        rb[i] = round_up_float(c * sqrt(ss));
        b_max = std::max(b_max, sqrt(ss));
      }
#pragma omp for schedule(static) nowait
      for (int64_t j0 = 0; j0 < cols; j0 += CB) {
        const int64_t nj = std::min(cols, j0 + CB) - j0;
        double col_ss[CB] = {};
        for (int64_t k = 0; k < rank; ++k) {
          float *dst = a32.get() + k * cols + j0;
          if (a_s1 == 1) {
            widen_run_cols<FDT>(a, k * a_s0 + j0, nj, dst, col_ss);
          } else {
            for (int64_t j = 0; j < nj; ++j) {
              const float x = load_factor<FDT>(a, k * a_s0 + (j0 + j) * a_s1);
              dst[j] = x;
              col_ss[j] += (double)x * x;
            }
          }
        }
        for (int64_t j = 0; j < nj; ++j) {
          finite &= isfinite(col_ss[j]) != 0;
          cb[j0 + j] = round_up_float(sqrt(col_ss[j]));
        }
      }
    }
  };
  if (factor_dtype == LOWRANK_DTYPE_FLOAT32)
    widen(std::integral_constant<int, DT_F32>{});
  else if (factor_dtype == LOWRANK_DTYPE_FLOAT16)
    widen(std::integral_constant<int, DT_F16>{});
  else
    widen(std::integral_constant<int, DT_BF16>{});
  if (!finite) return LOWRANK_ERR_NONFINITE;
  double slack = 1.1754943508222875e-38 * std::max(1.0, r * fabs(scale) * 1.01);
  if (fabs(scale) < 7.888609052210118e-31) {
    // |scale| < 2^-100: the per-element bound can fail here. Its rb * inv_c * cb term saturates
    // (merge_impl clamps inv_c = 1 / c0 to FLT_MAX; it was +Inf, and 0 * Inf a NaN bound that
    // certified anything), and below float's normal range |s - s32| <= u |s| (what its |acc| term
    // covers) fails too. So the slack takes all of it for every element: |s| |acc - sum| +
    // |s - s32| |acc| <= (|s| (r + 1) u (1.01) + |s - s32|) (1 + gamma_r) max ||B_i|| max ||A_j||
    // (a delta this small leaves almost every element certified all the same).
    double a_max = 0.0;
    for (int64_t j = 0; j < cols; ++j) a_max = std::max(a_max, (double)cb[j]);
    slack += (fabs(scale) * (r + 1.0) * u * 1.01 + fabs(scale - (double)(float)scale)) * b_max * a_max * 1.02;
  }
  const float abs_bound = round_up_float(slack);
  if (ldw < cols || !w) return LOWRANK_ERR_INVALID_ARGUMENT;
  const bool record = rec_idx != nullptr;
  if (record && (!rec_val || !rec_count || rec_capacity < 0 || rows * cols > INT32_MAX))
    return LOWRANK_ERR_INVALID_ARGUMENT;
  Args g{w, rows, cols, ldw, b32.get(), a32.get(), nullptr, rank, rb.get(), cb.get(), abs_bound, scale, record};
  g.fast = fast && !record;
  if (g.fast && put_count > 0) {
    g.put_idx = put_idx;
    g.put_val = put_val;
    g.put_count = put_count;
  }
  return merge_dispatch(g, dtype, rec_idx, rec_val, rec_capacity, rec_count);
}

extern "C" int lowrank_cpu_merge_strided(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                                         const void *b, int64_t b_s0, int64_t b_s1, const void *a,
                                         int64_t a_s0, int64_t a_s1, int factor_dtype, int64_t rank,
                                         double scale, int32_t *rec_idx, void *rec_val,
                                         int64_t rec_capacity, int64_t *rec_count) {
  return merge_strided(w, rows, cols, ldw, dtype, b, b_s0, b_s1, a, a_s0, a_s1, factor_dtype, rank, scale, rec_idx,
                       rec_val, rec_capacity, rec_count, false);
}

// Records come sorted (the CPU merge's, and the CUDA ones once argsorted) with ~cols / 20 of them
// per row: the row is found by a division only when an index leaves the current one (a division
// per record was most of a fast unmerge's restore: 1.4 ms at 1024x4096 with 4.6% recorded).
template <typename T>
static void restore_run(T *w, int64_t cols, int64_t ldw, const int32_t *idx, const T *val, int64_t count) {
  int64_t start = 0, row = 0;  // the current row and its first flat index
  for (int64_t n = 0; n < count; ++n) {
    const int64_t x = idx[n];
    if (x < start || x >= start + cols) {
      row = x / cols;
      start = row * cols;
    }
    w[row * ldw + (x - start)] = val[n];
  }
}

// A strictly increasing record (every record merge_ makes) is written back by all threads, each a
// contiguous share: no two shares touch one element, so the bits are the serial loop's (1024x4096
// bf16, r = 16, a delta of 30% of W's rms: 682k records, 1.2-1.35 ms serially). Any other record
// (a hand-made one, possibly with repeated indices: the last one wins) serially, in its order.
template <typename T>
static void restore_impl(T *w, int64_t cols, int64_t ldw, const int32_t *idx, const T *val, int64_t count,
                         bool increasing) {
  const int nthr = omp_get_max_threads();
  if (!increasing || nthr < 2 || count < (1 << 16)) {
    restore_run(w, cols, ldw, idx, val, count);
    return;
  }
#pragma omp parallel num_threads(nthr)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t n0 = count * t / nt, n1 = count * (t + 1) / nt;
    restore_run(w, cols, ldw, idx + n0, val + n0, n1 - n0);
  }
}

// Whether every index is in [0, rows * cols); *increasing: whether they strictly increase.
static bool record_in_range(int64_t rows, int64_t cols, const int32_t *idx, int64_t count, bool *increasing) {
  *increasing = true;
  if (count == 0) return true;
  int32_t lo = idx[0], hi = idx[0];
  int32_t descents = 0;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(| : descents)
  for (int64_t n = 1; n < count; ++n) {
    const int32_t x = idx[n];
    lo = std::min(lo, x);
    hi = std::max(hi, x);
    descents |= (int32_t)(x <= idx[n - 1]);
  }
  *increasing = descents == 0;
  return lo >= 0 && (int64_t)hi < rows * cols;
}

static int restore_dispatch(void *w, int64_t cols, int64_t ldw, int dtype, const int32_t *rec_idx,
                            const void *rec_val, int64_t count, bool increasing) {
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32:
      restore_impl((uint32_t *)w, cols, ldw, rec_idx, (const uint32_t *)rec_val, count, increasing);
      return LOWRANK_OK;
    case LOWRANK_DTYPE_FLOAT16:
    case LOWRANK_DTYPE_BFLOAT16:
      restore_impl((uint16_t *)w, cols, ldw, rec_idx, (const uint16_t *)rec_val, count, increasing);
      return LOWRANK_OK;
    default: return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  }
}

extern "C" int lowrank_cpu_unmerge_strided(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                                           const void *b, int64_t b_s0, int64_t b_s1, const void *a,
                                           int64_t a_s0, int64_t a_s1, int factor_dtype, int64_t rank,
                                           double scale, const int32_t *rec_idx, const void *rec_val,
                                           int64_t rec_count) {
  if (rec_count < 0 || (rec_count > 0 && (!rec_idx || !rec_val))) return LOWRANK_ERR_INVALID_ARGUMENT;
  if (dtype < LOWRANK_DTYPE_FLOAT32 || dtype > LOWRANK_DTYPE_BFLOAT16) return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  bool increasing = false;
  if (!record_in_range(rows, cols, rec_idx, rec_count, &increasing)) return LOWRANK_ERR_INVALID_ARGUMENT;  // before any write
  if (increasing)  // (every record merge_ makes) written back tile by tile, in the same pass over W
    return merge_strided(w, rows, cols, ldw, dtype, b, b_s0, b_s1, a, a_s0, a_s1, factor_dtype, rank, -scale,
                         nullptr, nullptr, 0, nullptr, true, rec_idx, rec_val, rec_count);
  const int status = merge_strided(w, rows, cols, ldw, dtype, b, b_s0, b_s1, a, a_s0, a_s1, factor_dtype, rank,
                                   -scale, nullptr, nullptr, 0, nullptr, true);
  if (status != LOWRANK_OK || rec_count == 0) return status;
  return restore_dispatch(w, cols, ldw, dtype, rec_idx, rec_val, rec_count, increasing);
}

extern "C" int lowrank_cpu_restore(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                                   const int32_t *rec_idx, const void *rec_val, int64_t count) {
  if (count == 0) return LOWRANK_OK;
  if (!w || !rec_idx || !rec_val || count < 0 || rows < 0 || cols <= 0 || ldw < cols)
    return LOWRANK_ERR_INVALID_ARGUMENT;
  if (dtype < LOWRANK_DTYPE_FLOAT32 || dtype > LOWRANK_DTYPE_BFLOAT16) return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  bool increasing = false;
  if (!record_in_range(rows, cols, rec_idx, count, &increasing)) return LOWRANK_ERR_INVALID_ARGUMENT;
  return restore_dispatch(w, cols, ldw, dtype, rec_idx, rec_val, count, increasing);
}

extern "C" int lowrank_cpu_rank_loop_kind(void) { return g_bf16_dot ? 1 : 0; }
