// NF4 dequantization on the CPU, bit-identical to lowrank's torch path (NF4Weight.dequantize) and to
// bitsandbytes: out[i] = round_to_dtype(fp32(code[nibble(i)] * absmax[i / blocksize])), with the
// double-quantized absmax decoded as fp32(fp32(nested_code[q] * nested_absmax[b / 256]) + offset)
// (two roundings, no fused multiply-add: the library is built with -ffp-contract=off).
//
// One pass: each program of the OpenMP loop takes whole quantization blocks, decodes the block's
// scale once, scales the 16-entry code table by it (so every value is the same fp32 product the
// torch path forms) and writes the block's outputs through that table: with AVX-512 (checked at
// load) one permute per 32 nibbles; otherwise loops built for x86-64-v3 (AVX2) and the baseline,
// chosen at run time (target_clones), so one library serves every x86-64 machine.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LOWRANK_X86 1
#endif

#include "lowrank.h"

namespace {

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN, as torch converts it
  u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest, ties to even
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t to_fp16(float f) {
  _Float16 h = static_cast<_Float16>(f);  // IEEE round to nearest even
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

template <int DTYPE>
inline void put(void *out, int64_t i, float v) {
  if constexpr (DTYPE == LOWRANK_DTYPE_FLOAT32) {
    static_cast<float *>(out)[i] = v;
  } else if constexpr (DTYPE == LOWRANK_DTYPE_BFLOAT16) {
    static_cast<uint16_t *>(out)[i] = to_bf16(v);
  } else {
    static_cast<uint16_t *>(out)[i] = to_fp16(v);
  }
}

#ifdef LOWRANK_X86
// One table lookup per nibble with AVX-512 permutes: 32 packed bytes -> 64 outputs. vh / vl hold
// the values of the even / odd elements; unpack interleaves them within 128-bit lanes and a
// qword permute puts the lanes in order.
__attribute__((target("avx512f,avx512bw"))) inline void interleave_store(__m512i vh, __m512i vl, void *dst,
                                                                          bool words, bool stream) {
  __m512i a = words ? _mm512_unpacklo_epi16(vh, vl) : _mm512_castps_si512(_mm512_unpacklo_ps(
                                                          _mm512_castsi512_ps(vh), _mm512_castsi512_ps(vl)));
  __m512i b = words ? _mm512_unpackhi_epi16(vh, vl) : _mm512_castps_si512(_mm512_unpackhi_ps(
                                                          _mm512_castsi512_ps(vh), _mm512_castsi512_ps(vl)));
  const __m512i idx0 = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i idx1 = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  if (stream) {  // 64-byte aligned, and the output is far larger than the caches: no read for ownership
    _mm512_stream_si512(static_cast<__m512i *>(dst), _mm512_permutex2var_epi64(a, idx0, b));
    _mm512_stream_si512(reinterpret_cast<__m512i *>(static_cast<char *>(dst) + 64),
                        _mm512_permutex2var_epi64(a, idx1, b));
  } else {
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi64(a, idx0, b));
    _mm512_storeu_si512(static_cast<char *>(dst) + 64, _mm512_permutex2var_epi64(a, idx1, b));
  }
}

// bf16 bits (in the low half of each 32-bit lane) of 16 floats: round to nearest even on the
// bits, NaN -> 0x7fc0 (torch's conversion; the AVX512-BF16 instruction would flush subnormal inputs)
__attribute__((target("avx512f,avx512bw"))) inline __m512i bf16_bits(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                  _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  r = _mm512_srli_epi32(r, 16);
  __mmask16 nan = _mm512_cmp_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                        _mm512_set1_epi32(0x7f800000), _MM_CMPINT_NLE);
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
}

// A whole block's outputs: the 16-entry table is the code vector times the block's scale (the
// same fp32 products as the scalar path), rounded to the output dtype in one vector step, then
// one permute per 32 nibbles. `bytes`: a multiple of 32 (16 for fp32).
template <int DTYPE>
__attribute__((target("avx512f,avx512bw"))) void block_avx512(const uint8_t *src, int64_t bytes, float scale,
                                                              const float *code, void *out, bool stream) {
  const __m512 lutf = _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(scale));
  if constexpr (DTYPE == LOWRANK_DTYPE_FLOAT32) {
    float *dst = static_cast<float *>(out);
    const __m512i fifteen = _mm512_set1_epi32(15);
    for (int64_t j = 0; j < bytes; j += 16) {
      __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + j)));
      __m512 vh = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), lutf);
      __m512 vl = _mm512_permutexvar_ps(_mm512_and_si512(w, fifteen), lutf);
      interleave_store(_mm512_castps_si512(vh), _mm512_castps_si512(vl), dst + 2 * j, false, stream);
    }
  } else {
    __m256i lut16;
    if constexpr (DTYPE == LOWRANK_DTYPE_BFLOAT16) {
      lut16 = _mm512_cvtepi32_epi16(bf16_bits(lutf));
    } else {
      lut16 = _mm512_cvtps_ph(lutf, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    const __m512i lut = _mm512_castsi256_si512(lut16);
    const __m512i fifteen = _mm512_set1_epi16(15);
    uint16_t *dst = static_cast<uint16_t *>(out);
    for (int64_t j = 0; j < bytes; j += 32) {
      __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(src + j)));
      __m512i vh = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), lut);
      __m512i vl = _mm512_permutexvar_epi16(_mm512_and_si512(w, fifteen), lut);
      interleave_store(vh, vl, dst + 2 * j, true, stream);
    }
  }
}

const bool kAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
const bool kAvx512 = false;
#endif

// The fp32 scale of block b: the stored absmax, or the double-quantized one decoded with two
// roundings (as the torch path and bitsandbytes: no fused multiply-add).
struct Scales {
  const uint8_t *q;
  const float *f;
  const float *nested_absmax;
  const float *nested_code;
  float offset;
  int64_t nested_blocksize;
  inline float operator()(int64_t b) const {
    if (q == nullptr) return f[b];
    float t = nested_code[q[b]] * nested_absmax[b / nested_blocksize];  // rounded once
    return t + offset;                                                  // rounded twice
  }
};

template <int DTYPE>
constexpr int64_t kElem = DTYPE == LOWRANK_DTYPE_FLOAT32 ? 4 : 2;

// `count` outputs of one block (count even except for the whole weight's last element) through a
// 16-entry table; loops built for x86-64-v3 (AVX2) and the baseline, chosen at run time.
template <int DTYPE>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void block_portable(const uint8_t *src, int64_t count, float scale, const float *code, void *out) {
  const int64_t pairs = count / 2;
  float lut[16];
  for (int j = 0; j < 16; ++j) lut[j] = code[j] * scale;
  if constexpr (DTYPE == LOWRANK_DTYPE_FLOAT32) {
    float *dst = static_cast<float *>(out);
#pragma omp simd
    for (int64_t j = 0; j < pairs; ++j) {
      dst[2 * j] = lut[src[j] >> 4];
      dst[2 * j + 1] = lut[src[j] & 15];
    }
  } else {
    uint16_t *dst = static_cast<uint16_t *>(out);
    uint16_t lut16[16];
    for (int j = 0; j < 16; ++j) {
      lut16[j] = DTYPE == LOWRANK_DTYPE_BFLOAT16 ? to_bf16(lut[j]) : to_fp16(lut[j]);
    }
#pragma omp simd
    for (int64_t j = 0; j < pairs; ++j) {
      dst[2 * j] = lut16[src[j] >> 4];
      dst[2 * j + 1] = lut16[src[j] & 15];
    }
  }
  if (count & 1) put<DTYPE>(out, count - 1, lut[src[pairs] >> 4]);  // the odd last element
}

template <int DTYPE>
void decode(const uint8_t *packed, const Scales &scales, const float *code, int64_t n, int64_t blocksize, void *out) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t out_bytes = n * (DTYPE == LOWRANK_DTYPE_FLOAT32 ? 4 : 2);
  const bool stream = out_bytes >= (8 << 20) && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
  for (int64_t b = 0; b < blocks; ++b) {
    const float scale = scales(b);
    const int64_t start = b * blocksize;  // even: blocksize is a multiple of 32
    const int64_t count = (start + blocksize <= n) ? blocksize : n - start;
    const uint8_t *src = packed + start / 2;
#ifdef LOWRANK_X86
    if (kAvx512 && count == blocksize && blocksize % 64 == 0) {
      block_avx512<DTYPE>(src, count / 2, scale, code, static_cast<char *>(out) + start * kElem<DTYPE>, stream);
      continue;
    }
#endif
    block_portable<DTYPE>(src, count, scale, code, static_cast<char *>(out) + start * kElem<DTYPE>);
  }
#ifdef LOWRANK_X86
  if (stream) _mm_sfence();  // each thread drains its streaming stores before the region's barrier
#endif
  }
}

// Rows [r0, r1) x columns [c0, c1) of the (rows x k) weight into out (row stride ldo elements):
// whole blocks only (k, c0 and c1 multiples of blocksize), for the QLoRA op's cache-sized tiles.
template <int DTYPE>
void decode_tile(const uint8_t *packed, const Scales &scales, const float *code, int64_t k, int64_t blocksize,
                 int64_t r0, int64_t r1, int64_t c0, int64_t c1, void *out, int64_t ldo) {
  const int64_t per_row = (c1 - c0) / blocksize, blocks_per_row = k / blocksize;
  const int64_t total = (r1 - r0) * per_row;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t r = r0 + t / per_row, bb = t % per_row;
    const int64_t col = c0 + bb * blocksize;
    const float scale = scales(r * blocks_per_row + col / blocksize);
    const uint8_t *src = packed + (r * k + col) / 2;
    char *dst = static_cast<char *>(out) + ((r - r0) * ldo + bb * blocksize) * kElem<DTYPE>;
#ifdef LOWRANK_X86
    if (kAvx512 && blocksize % 64 == 0) {
      block_avx512<DTYPE>(src, blocksize / 2, scale, code, dst, false);
      continue;
    }
#endif
    block_portable<DTYPE>(src, blocksize, scale, code, dst);
  }
}

// ---- y = x @ deq(W)^T for a few rows of x (decode and multiply in one pass) --------------------
// Each weight value enters the product as the dense weight in the compute dtype would hold it:
// fp32(code * scale) rounded to DTYPE and widened back (exact), so the result is x @ deq(W)^T
// accumulated in fp32. The 4-bit weight is read once; x (at most 16 rows, widened to fp32) stays in
// the caches.
inline float widen_bf16(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float widen_fp16(uint16_t v) {
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return static_cast<float>(h);
}

template <int DTYPE>
inline float load_widened(const void *x, int64_t i) {
  if constexpr (DTYPE == LOWRANK_DTYPE_FLOAT32) {
    return static_cast<const float *>(x)[i];
  } else if constexpr (DTYPE == LOWRANK_DTYPE_BFLOAT16) {
    return widen_bf16(static_cast<const uint16_t *>(x)[i]);
  } else {
    return widen_fp16(static_cast<const uint16_t *>(x)[i]);
  }
}

template <int DTYPE>
inline float as_weight(float v) {  // the value the dense weight in DTYPE holds, widened to fp32
  if constexpr (DTYPE == LOWRANK_DTYPE_FLOAT32) {
    return v;
  } else if constexpr (DTYPE == LOWRANK_DTYPE_BFLOAT16) {
    return widen_bf16(to_bf16(v));
  } else {
    return widen_fp16(to_fp16(v));
  }
}

constexpr int kMaxRowsPerPass = 8;  // rows of x per pass over a weight row (two accumulators each)

#ifdef LOWRANK_X86
template <int DTYPE>
__attribute__((target("avx512f,avx512bw"))) inline __m512 as_weight_avx512(__m512 v) {
  if constexpr (DTYPE == LOWRANK_DTYPE_FLOAT32) {
    return v;
  } else if constexpr (DTYPE == LOWRANK_DTYPE_BFLOAT16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
  } else {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// One weight row against MT rows of x. xp holds x in fp32 with every 32 consecutive elements
// reordered as [the 16 even ones | the 16 odd ones], the order in which the high and low nibbles
// of 16 packed bytes come out of the table permutes.
template <int DTYPE, int MT>
__attribute__((target("avx512f,avx512bw"))) void row_avx512(const uint8_t *src, int64_t k, int64_t blocksize,
                                                            int64_t b0, const Scales &scales, const float *code,
                                                            const float *xp, float *y, int64_t ldy) {
  __m512 hi[MT], lo[MT];
  for (int i = 0; i < MT; ++i) hi[i] = lo[i] = _mm512_setzero_ps();
  const __m512 codev = _mm512_loadu_ps(code);
  const __m512i fifteen = _mm512_set1_epi32(15);
  const int64_t blocks = k / blocksize;
  for (int64_t bb = 0; bb < blocks; ++bb) {
    const __m512 lut = as_weight_avx512<DTYPE>(_mm512_mul_ps(codev, _mm512_set1_ps(scales(b0 + bb))));
    const uint8_t *s = src + bb * (blocksize / 2);
    const float *xb = xp + bb * blocksize;
    for (int64_t j = 0; j < blocksize / 2; j += 16) {
      __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(s + j)));
      __m512 vh = _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4), lut);
      __m512 vl = _mm512_permutexvar_ps(_mm512_and_si512(w, fifteen), lut);
      for (int i = 0; i < MT; ++i) {
        hi[i] = _mm512_fmadd_ps(vh, _mm512_loadu_ps(xb + i * k + 2 * j), hi[i]);
        lo[i] = _mm512_fmadd_ps(vl, _mm512_loadu_ps(xb + i * k + 2 * j + 16), lo[i]);
      }
    }
  }
  for (int i = 0; i < MT; ++i) y[i * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(hi[i], lo[i]));
}

template <int DTYPE>
void rows_avx512(int mt, const uint8_t *src, int64_t k, int64_t blocksize, int64_t b0, const Scales &scales,
                 const float *code, const float *xp, float *y, int64_t ldy) {
  switch (mt) {
#define LOWRANK_ROWS(MT) \
  case MT:               \
    return row_avx512<DTYPE, MT>(src, k, blocksize, b0, scales, code, xp, y, ldy);
    LOWRANK_ROWS(1) LOWRANK_ROWS(2) LOWRANK_ROWS(3) LOWRANK_ROWS(4)
    LOWRANK_ROWS(5) LOWRANK_ROWS(6) LOWRANK_ROWS(7) LOWRANK_ROWS(8)
#undef LOWRANK_ROWS
    default:
      return;
  }
}
#endif

// Portable: one weight row against MT rows of x (natural order), one block's table at a time.
template <int DTYPE>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void row_portable(int mt, const uint8_t *src, int64_t k, int64_t blocksize, int64_t b0, const Scales &scales,
                  const float *code, const float *xf, float *y, int64_t ldy) {
  float acc[kMaxRowsPerPass] = {0};
  float lut[16];
  for (int64_t bb = 0; bb < k / blocksize; ++bb) {
    const float scale = scales(b0 + bb);
    for (int j = 0; j < 16; ++j) lut[j] = as_weight<DTYPE>(code[j] * scale);
    const uint8_t *s = src + bb * (blocksize / 2);
    for (int i = 0; i < mt; ++i) {
      const float *xb = xf + i * k + bb * blocksize;
      float a = 0.0f;
#pragma omp simd reduction(+ : a)
      for (int64_t j = 0; j < blocksize / 2; ++j) a += lut[s[j] >> 4] * xb[2 * j] + lut[s[j] & 15] * xb[2 * j + 1];
      acc[i] += a;
    }
  }
  for (int i = 0; i < mt; ++i) y[i * ldy] = acc[i];
}

template <int DTYPE>
void matmul(const void *x, int64_t m, const uint8_t *packed, const Scales &scales, const float *code, int64_t n,
            int64_t k, int64_t blocksize, float *y) {
#ifdef LOWRANK_X86
  const bool vec = kAvx512;
#else
  const bool vec = false;
#endif
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t pos = vec ? (j & ~int64_t(31)) + (j & 1) * 16 + ((j & 31) >> 1) : j;
      xf[i * k + pos] = load_widened<DTYPE>(x, i * k + j);
    }
  }
  const int64_t blocks_per_row = k / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t *src = packed + row * (k / 2);
    for (int64_t m0 = 0; m0 < m; m0 += kMaxRowsPerPass) {
      const int mt = static_cast<int>(m - m0 < kMaxRowsPerPass ? m - m0 : kMaxRowsPerPass);
#ifdef LOWRANK_X86
      if (vec) {
        rows_avx512<DTYPE>(mt, src, k, blocksize, row * blocks_per_row, scales, code, xf.data() + m0 * k,
                           y + m0 * n + row, n);
        continue;
      }
#endif
      row_portable<DTYPE>(mt, src, k, blocksize, row * blocks_per_row, scales, code, xf.data() + m0 * k,
                          y + m0 * n + row, n);
    }
  }
}

Scales make_scales(const void *absmax, int double_quant, const float *nested_absmax, const float *nested_code,
                   float offset, int64_t nested_blocksize) {
  return Scales{double_quant ? static_cast<const uint8_t *>(absmax) : nullptr,
                double_quant ? nullptr : static_cast<const float *>(absmax), nested_absmax, nested_code, offset,
                nested_blocksize};
}

// fn(std::integral_constant<int, DTYPE>{}) for the dtype code, LOWRANK_OK after it; unknown codes refused.
template <class Fn>
int by_dtype(int dtype, Fn &&fn) {
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32:
      fn(std::integral_constant<int, LOWRANK_DTYPE_FLOAT32>{});
      return LOWRANK_OK;
    case LOWRANK_DTYPE_BFLOAT16:
      fn(std::integral_constant<int, LOWRANK_DTYPE_BFLOAT16>{});
      return LOWRANK_OK;
    case LOWRANK_DTYPE_FLOAT16:
      fn(std::integral_constant<int, LOWRANK_DTYPE_FLOAT16>{});
      return LOWRANK_OK;
    default:
      return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  }
}

}  // namespace

extern "C" int lowrank_cpu_nf4_matmul(const void *x, int64_t m, const uint8_t *packed, const void *absmax,
                                      int double_quant, const float *nested_absmax, const float *nested_code,
                                      float offset, const float *code, int64_t n, int64_t k, int64_t blocksize,
                                      int64_t nested_blocksize, float *y, int dtype) {
  if (x == nullptr || packed == nullptr || absmax == nullptr || code == nullptr || y == nullptr || m < 0 ||
      n < 0 || k <= 0 || blocksize < 32 || (blocksize & (blocksize - 1)) != 0 || k % blocksize != 0 ||
      (double_quant && (nested_absmax == nullptr || nested_code == nullptr || nested_blocksize < 1))) {
    return LOWRANK_ERR_INVALID_ARGUMENT;
  }
  const Scales scales = make_scales(absmax, double_quant, nested_absmax, nested_code, offset, nested_blocksize);
  return by_dtype(dtype, [&](auto dt) { matmul<decltype(dt)::value>(x, m, packed, scales, code, n, k, blocksize, y); });
}

extern "C" int lowrank_cpu_nf4_decode_tile(const uint8_t *packed, const void *absmax, int double_quant,
                                           const float *nested_absmax, const float *nested_code, float offset,
                                           const float *code, int64_t rows, int64_t k, int64_t blocksize,
                                           int64_t nested_blocksize, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                                           void *out, int64_t ldo, int dtype) {
  if (packed == nullptr || absmax == nullptr || code == nullptr || out == nullptr || k <= 0 || blocksize < 32 ||
      (blocksize & (blocksize - 1)) != 0 || k % blocksize != 0 || r0 < 0 || r1 < r0 || r1 > rows || c0 < 0 ||
      c1 < c0 || c1 > k || c0 % blocksize != 0 || c1 % blocksize != 0 || ldo < c1 - c0 ||
      (double_quant && (nested_absmax == nullptr || nested_code == nullptr || nested_blocksize < 1))) {
    return LOWRANK_ERR_INVALID_ARGUMENT;
  }
  const Scales scales = make_scales(absmax, double_quant, nested_absmax, nested_code, offset, nested_blocksize);
  return by_dtype(dtype, [&](auto dt) {
    decode_tile<decltype(dt)::value>(packed, scales, code, k, blocksize, r0, r1, c0, c1, out, ldo);
  });
}

extern "C" int lowrank_cpu_nf4_dequantize(const uint8_t *packed, const void *absmax, int double_quant,
                                          const float *nested_absmax, const float *nested_code, float offset,
                                          const float *code, int64_t n, int64_t blocksize,
                                          int64_t nested_blocksize, void *out, int dtype) {
  if (packed == nullptr || absmax == nullptr || code == nullptr || out == nullptr || n < 0 || blocksize < 32 ||
      (blocksize & (blocksize - 1)) != 0 ||
      (double_quant && (nested_absmax == nullptr || nested_code == nullptr || nested_blocksize < 1))) {
    return LOWRANK_ERR_INVALID_ARGUMENT;
  }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  {
    // A fresh output buffer costs more in page faults than the decode itself (4 KB pages: ~8,000
    // faults for a 4096x4096 bf16 weight). Ask for transparent huge pages on its 2 MB-aligned
    // interior before the first write; a hint only (ignored where THP is off).
    const int64_t elem = dtype == LOWRANK_DTYPE_FLOAT32 ? 4 : 2;
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(out) + (2u << 20) - 1) & ~uintptr_t((2u << 20) - 1);
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(out) + uintptr_t(n * elem)) & ~uintptr_t((2u << 20) - 1);
    if (hi > lo) madvise(reinterpret_cast<void *>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  const Scales scales = make_scales(absmax, double_quant, nested_absmax, nested_code, offset, nested_blocksize);
  return by_dtype(dtype, [&](auto dt) { decode<decltype(dt)::value>(packed, scales, code, n, blocksize, out); });
}
