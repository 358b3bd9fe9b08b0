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
      // round to nearest even on the bits, NaN -> 0x7fc0 (torch's conversion; the AVX512-BF16
      // instruction would flush subnormal inputs)
      __m512i u = _mm512_castps_si512(lutf);
      __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                      _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                       _mm512_set1_epi32(1))));
      r = _mm512_srli_epi32(r, 16);
      __mmask16 nan = _mm512_cmp_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000), _MM_CMPINT_NLE);
      r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
      lut16 = _mm512_cvtepi32_epi16(r);
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

template <int DTYPE>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void decode(const uint8_t *packed, const uint8_t *absmax_q, const float *absmax_f, const float *nested_absmax,
            const float *nested_code, float offset, const float *code, int64_t n, int64_t blocksize,
            int64_t nested_blocksize, void *out) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t out_bytes = n * (DTYPE == LOWRANK_DTYPE_FLOAT32 ? 4 : 2);
  const bool stream = out_bytes >= (8 << 20) && (reinterpret_cast<uintptr_t>(out) & 63) == 0;
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
  for (int64_t b = 0; b < blocks; ++b) {
    float scale;
    if (absmax_q != nullptr) {
      float t = nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize];  // rounded once
      scale = t + offset;                                                        // rounded twice
    } else {
      scale = absmax_f[b];
    }
    const int64_t start = b * blocksize;  // even: blocksize is a multiple of 32
    const int64_t count = (start + blocksize <= n) ? blocksize : n - start;
    const uint8_t *src = packed + start / 2;
    const int64_t pairs = count / 2;
#ifdef LOWRANK_X86
    if (kAvx512 && count == blocksize && blocksize % 64 == 0) {
      char *dst = static_cast<char *>(out) + start * (DTYPE == LOWRANK_DTYPE_FLOAT32 ? 4 : 2);
      block_avx512<DTYPE>(src, pairs, scale, code, dst, stream);
      continue;
    }
#endif
    float lut[16];
    for (int j = 0; j < 16; ++j) lut[j] = code[j] * scale;
    if constexpr (DTYPE == LOWRANK_DTYPE_FLOAT32) {
      float *dst = static_cast<float *>(out) + start;
#pragma omp simd
      for (int64_t j = 0; j < pairs; ++j) {
        dst[2 * j] = lut[src[j] >> 4];
        dst[2 * j + 1] = lut[src[j] & 15];
      }
    } else {
      uint16_t *dst = static_cast<uint16_t *>(out) + start;
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
    if (count & 1) put<DTYPE>(out, start + count - 1, lut[src[pairs] >> 4]);  // the odd last element
  }
#ifdef LOWRANK_X86
  if (stream) _mm_sfence();  // each thread drains its streaming stores before the region's barrier
#endif
  }
}

}  // namespace

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
  const uint8_t *q = double_quant ? static_cast<const uint8_t *>(absmax) : nullptr;
  const float *f = double_quant ? nullptr : static_cast<const float *>(absmax);
  switch (dtype) {
    case LOWRANK_DTYPE_FLOAT32:
      decode<LOWRANK_DTYPE_FLOAT32>(packed, q, f, nested_absmax, nested_code, offset, code, n, blocksize,
                                    nested_blocksize, out);
      return LOWRANK_OK;
    case LOWRANK_DTYPE_BFLOAT16:
      decode<LOWRANK_DTYPE_BFLOAT16>(packed, q, f, nested_absmax, nested_code, offset, code, n, blocksize,
                                     nested_blocksize, out);
      return LOWRANK_OK;
    case LOWRANK_DTYPE_FLOAT16:
      decode<LOWRANK_DTYPE_FLOAT16>(packed, q, f, nested_absmax, nested_code, offset, code, n, blocksize,
                                    nested_blocksize, out);
      return LOWRANK_OK;
    default:
      return LOWRANK_ERR_UNSUPPORTED_DTYPE;
  }
}
