/* Element-wise numerics of merge / unmerge, shared by merge_cpu.cpp and merge_cuda.cu.
 *
 * Note: one rounding, certified.
 *   The exact value is t = W + s * sum_k B[i,k] * A[k,j]. The fast path computes it in fp32:
 *     acc = fma(B[i,k], A[k,j], acc) for k = 0 .. r-1   (factors widened to fp32 exactly)
 *     v   = fma(s32, acc, W)                              (s32 = (float)s)
 *   and bounds |v - t| <= e = row_bound[i] * col_bound[j] + 2^-24 |v| (1+2^-20) + abs_bound, where
 *   row_bound[i] * col_bound[j] >= |s| (gamma_r (1+u) + u) ||B[i,:]|| ||A[:,j]|| (Cauchy-Schwarz bounds
 *   sum_k |B[i,k] A[k,j]|; gamma_r = r u / (1 - r u), u = 2^-24; the extra u covers s32 != s).
 *   For fp16 / bf16 weights, round(v) is the correctly rounded t whenever v is farther than e from
 *   every rounding midpoint of the target format (`certified_*` below), which is the case for all
 *   but ~0.1% of elements at r = 16. The others take the slow path: the same sum in double
 *   (products of fp32 numbers are exact in double), v = W + s * acc (two double ops, no fma), then
 *   one correct rounding from double to the target (round-to-odd to float, then nearest-even).
 *   Both paths give the rounding of the exact t except when t lies within ~r 2^-53 |t| of a
 *   midpoint; the fast path's answer always equals the slow path's (the slow path's error is far
 *   below e), so the pure-torch fallback, which evaluates the slow path for every element, gives
 *   bit-identical results.
 *   fp32 weights have no wider format to round into: their result is v itself (one fp32 rounding
 *   of s32 * acc + W, with acc's own r roundings), within e of t.
 */
#ifndef LOWRANK_MERGE_MATH_H_
#define LOWRANK_MERGE_MATH_H_

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define LR_HD __host__ __device__ __forceinline__
#else
#define LR_HD static inline
#endif

namespace lowrank {

LR_HD uint32_t f2u(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

LR_HD float u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

LR_HD uint64_t d2u(double d) {
#ifdef __CUDA_ARCH__
  return (uint64_t)__double_as_longlong(d);
#else
  uint64_t u;
  memcpy(&u, &d, 8);
  return u;
#endif
}

/* ---- storage <-> float, branch-free so that CPU loops vectorize -------------------------- */

LR_HD float bf16_to_float(uint32_t h) { return u2f(h << 16); }

LR_HD float half_to_float(uint32_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t em = h & 0x7FFFu;
  uint32_t normal = (em << 13) + 0x38000000u;           /* rebias 15 -> 127 */
  uint32_t infnan = (em << 13) | 0x7F800000u;
  float sub = (float)(int)(h & 0x3FFu) * 5.9604644775390625e-8f; /* m * 2^-24, exact */
  /* masks instead of ?: -- GCC 12 would not vectorize the selects here */
  uint32_t is_infnan = 0u - (uint32_t)(em >= 0x7C00u);
  uint32_t is_sub = 0u - (uint32_t)(em < 0x0400u);
  uint32_t bits = (normal & ~is_infnan) | (infnan & is_infnan);
  bits = (bits & ~is_sub) | (f2u(sub) & is_sub);
  return u2f(bits | sign);
}

/* Nearest-even rounding of a float whose magnitude is in the target's normal range (the fast path
 * only uses these where `certified_*` said so; anything else goes through the slow path). */
LR_HD uint32_t float_to_bf16_normal(float v) {
  uint32_t u = f2u(v);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

LR_HD uint32_t float_to_half_normal(float v) {
  uint32_t u = f2u(v);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t mag = u & 0x7FFFFFFFu;
  return sign | (((mag + 0xFFFu + ((mag >> 13) & 1u)) >> 13) - (112u << 10));
}

/* True when every real number within e of v rounds to the same target value as v: v is farther
 * than e from the nearest rounding midpoint. Midpoints are fp32 numbers, so comparing e with the
 * exact distance d * ulp32(v) is rigorous. Outside the target's normal range (zero, subnormal,
 * top binade, Inf, NaN): false. */
LR_HD int32_t certified_bf16(float v, float e) {
  uint32_t u = f2u(v);
  int32_t ex = (int32_t)((u >> 23) & 0xFFu);
  int32_t low = (int32_t)(u & 0xFFFFu);
  int32_t d = low > 0x8000 ? low - 0x8000 : 0x8000 - low;
  d = d < 0x4000 ? d : 0x4000; /* the next binade's midpoints are >= 2^14 ulps away */
  float ulp = u2f((uint32_t)((ex >= 24 ? ex : 24) - 23) << 23);
  return (int32_t)(ex >= 24) & (int32_t)(ex <= 253) & (int32_t)(e < (float)d * ulp);
}

LR_HD int32_t certified_half(float v, float e) {
  uint32_t u = f2u(v);
  int32_t ex = (int32_t)((u >> 23) & 0xFFu);
  int32_t low = (int32_t)(u & 0x1FFFu);
  int32_t d = low > 0x1000 ? low - 0x1000 : 0x1000 - low;
  d = d < 0x800 ? d : 0x800;
  float ulp = u2f((uint32_t)((ex >= 24 ? ex : 24) - 23) << 23);
  /* fp16 normal range without its top binade: 2^-14 <= |v| < 2^15 */
  return (int32_t)(ex >= 113) & (int32_t)(ex <= 141) & (int32_t)(e < (float)d * ulp);
}

LR_HD float error_bound(float rb, float cb, float v, float abs_bound) {
  float e = fmaf(rb, cb, fabsf(v) * 6.0e-8f); /* 6.0e-8 > 2^-24 (1 + 2^-23) */
  return fmaf(e, 9.5367431640625e-07f, e) + abs_bound; /* e (1 + 2^-20): covers this line's roundings */
}

/* ---- the slow path: double, rounded once ------------------------------------------------ */

/* Round-to-odd from double to float: with >= 2 spare bits, a later nearest-even rounding to
 * bf16 or fp16 then equals the direct nearest-even rounding of d. */
LR_HD float double_to_float_odd(double d) {
  float f = (float)d;
  if (d == d && (double)f != d && (f2u(f) & 1u) == 0u) {
    f = nextafterf(f, (double)f < d ? INFINITY : -INFINITY);
  }
  return f;
}

LR_HD uint32_t float_to_bf16_full(float f) {
  uint32_t u = f2u(f);
  if (f != f) return (u >> 16) | 0x40u; /* quiet NaN, sign kept */
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

LR_HD uint32_t float_to_half_full(float f) {
  uint32_t u = f2u(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t mag = u & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return sign | 0x7E00u; /* NaN */
  if (mag >= 0x477FF000u) return sign | 0x7C00u; /* >= 65520 (and Inf) rounds to Inf */
  if (mag >= 0x38800000u) {                      /* >= 2^-14: normal */
    return sign | (((mag + 0xFFFu + ((mag >> 13) & 1u)) >> 13) - (112u << 10));
  }
  if (mag < 0x33000000u) return sign; /* < 2^-25: rounds to zero (2^-25 itself ties to even 0) */
  /* subnormal: value = m * 2^-24 with m in [0, 1024]; round the full significand */
  uint32_t ex = mag >> 23;
  uint32_t sig = (mag & 0x7FFFFFu) | 0x800000u;
  uint32_t shift = 126u - ex; /* ex in [102, 112] -> shift in [14, 24] */
  uint32_t q = sig >> shift;
  uint32_t rem = sig & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) q += 1u;
  return sign | q;
}

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

/* The storage word of each dtype code: Store<DT>::T. */
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
LR_HD double storage_to_double(uint32_t bits) {
  if (DT == DT_F32) return (double)u2f(bits);
  if (DT == DT_F16) return (double)half_to_float(bits);
  return (double)bf16_to_float(bits);
}

template <int DT>
LR_HD uint32_t double_to_storage(double d) {
  if (DT == DT_F32) return f2u((float)d);
  float f = double_to_float_odd(d);
  return DT == DT_F16 ? float_to_half_full(f) : float_to_bf16_full(f);
}

/* Slow-path result for one element: round(w + s * sum_k b[k * bstride] * a[k * astride]). */
template <int DT>
LR_HD uint32_t slow_element(uint32_t wbits, double s, double acc) {
  double w = storage_to_double<DT>(wbits);
#ifdef __CUDA_ARCH__
  double v = __dadd_rn(w, __dmul_rn(s, acc)); /* no contraction into an fma */
#else
  double v = w + s * acc; /* merge_cpu.cpp is built with -ffp-contract=off */
#endif
  return double_to_storage<DT>(v);
}

/* ---- DoRA (lowrank.h, lowrank/ops/dora_merge.py): the torch path's float64 operations ---------- */

/* delta = acc * s; round(scale * (w + delta)): three double roundings, then one to the target. */
template <int DT>
LR_HD uint32_t dora_merge_element(uint32_t wbits, double acc, double s, double scale) {
  double w = storage_to_double<DT>(wbits);
#ifdef __CUDA_ARCH__
  double y = __dmul_rn(scale, __dadd_rn(w, __dmul_rn(acc, s)));
#else
  double y = scale * (w + acc * s);
#endif
  return double_to_storage<DT>(y);
}

/* round(m * inv - acc * s) */
template <int DT>
LR_HD uint32_t dora_unmerge_element(uint32_t mbits, double acc, double s, double inv) {
  double m = storage_to_double<DT>(mbits);
#ifdef __CUDA_ARCH__
  double y = __dsub_rn(__dmul_rn(m, inv), __dmul_rn(acc, s));
#else
  double y = m * inv - acc * s;
#endif
  return double_to_storage<DT>(y);
}

/* Inf or NaN in the stored format. */
template <int DT>
LR_HD bool storage_nonfinite(uint32_t bits) {
  if (DT == DT_F32) return (bits & 0x7F800000u) == 0x7F800000u;
  if (DT == DT_F16) return (bits & 0x7C00u) == 0x7C00u;
  return (bits & 0x7F80u) == 0x7F80u;
}

}  // namespace lowrank

#endif /* LOWRANK_MERGE_MATH_H_ */
