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

#define LOWRANK_ABI_VERSION 7

enum lowrank_status {
  LOWRANK_OK = 0,
  LOWRANK_ERR_INVALID_ARGUMENT = 1,
  LOWRANK_ERR_UNSUPPORTED_DTYPE = 2,
  LOWRANK_ERR_CUDA = 3,
  LOWRANK_ERR_OUT_OF_MEMORY = 4,
  LOWRANK_ERR_CAPACITY = 5,
  LOWRANK_ERR_NONFINITE = 6, /* a LoRA factor holds NaN or Inf: nothing was written */
  LOWRANK_ERR_OVERFLOW = 7,  /* a finite weight element would round to Inf / NaN: nothing was written */
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
/* Which rank loop a CPU merge of a 16-bit weight may take here: 1 when the bf16 pair loop
 * (AVX512_BF16) is available, which merges factors whose values are all normal bf16 numbers or zero
 * with its own accumulation bits; 0 when every merge takes the fp32 fma loop (the same bits on
 * AVX-512, AVX2 and the portable code). A record made by an exact merge serves the fast unmerge
 * (lowrank_cpu_unmerge_strided) only where this returns the same value; the certified unmerge and
 * a restore are exact with it anywhere. */
int lowrank_cpu_rank_loop_kind(void);

int lowrank_cuda_abi_version(void);
/* e.g. "cuda 13.0 sm_80 sm_90". Static storage. */
const char *lowrank_cuda_build_info(void);
/* Human-readable message for the last CUDA error seen by this library on this thread. */
const char *lowrank_cuda_last_error(void);

/* ---- NF4 dequantization (CPU) ----------------------------------------------------------------
 * out[i] (dtype code; n elements, contiguous) = round(fp32(code[nibble i] * absmax of i's block)),
 * bit-identical to lowrank's torch path and to bitsandbytes. packed: (n + 1) / 2 bytes, element
 * 2j in the high nibble of byte j. double_quant != 0: absmax is uint8 (blocks,) decoded as
 * fp32(fp32(nested_code[q] * nested_absmax[b / nested_blocksize]) + offset); else fp32 (blocks,).
 * code: the 16 fp32 NF4 values. blocksize: a power of two >= 32. OpenMP over blocks. */
int lowrank_cpu_nf4_dequantize(const uint8_t *packed, const void *absmax, int double_quant,
                               const float *nested_absmax, const float *nested_code, float offset,
                               const float *code, int64_t n, int64_t blocksize, int64_t nested_blocksize,
                               void *out, int dtype);

/* Rows [r0, r1) x columns [c0, c1) of the NF4 weight (rows x k, stored as above) decoded into out
 * (dtype code, row stride ldo elements), bit-identical to the same elements of
 * lowrank_cpu_nf4_dequantize. Whole blocks only: k, c0 and c1 multiples of blocksize. */
int lowrank_cpu_nf4_decode_tile(const uint8_t *packed, const void *absmax, int double_quant,
                                const float *nested_absmax, const float *nested_code, float offset,
                                const float *code, int64_t rows, int64_t k, int64_t blocksize,
                                int64_t nested_blocksize, int64_t r0, int64_t r1, int64_t c0, int64_t c1, void *out,
                                int64_t ldo, int dtype);

/* y (m x n fp32, contiguous) = x (m x k, dtype code, contiguous) @ deq(W)^T for the NF4 weight W
 * (n x k, stored as above), each weight value rounded to dtype as the dense weight would hold it,
 * products accumulated in fp32: decode and multiply in one pass, the 4-bit weight read once (for
 * small m: at most 8 rows of x per pass over a weight row). k: a multiple of blocksize. OpenMP
 * over the rows of W. */
int lowrank_cpu_nf4_matmul(const void *x, int64_t m, const uint8_t *packed, const void *absmax, int double_quant,
                           const float *nested_absmax, const float *nested_code, float offset, const float *code,
                           int64_t n, int64_t k, int64_t blocksize, int64_t nested_blocksize, float *y, int dtype);

/* ---- merge / unmerge ------------------------------------------------------------------------
 * W (rows x cols, row-major, row stride ldw elements, dtype code) is updated in place:
 *     W <- round(W + scale * B @ A)
 * b: rows x rank, a: rank x cols, both fp32, contiguous (the caller widens and, for a weight stored
 * transposed, swaps and transposes the factors: W^T + s B A = (W + s A^T B^T)^T).
 * row_bound (rows), col_bound (cols), abs_bound: the error-bound terms of merge_math.h; the caller
 * computes them from the factors (row_bound[i] * col_bound[j] >= |scale| (gamma_r (1+u) + u)
 * ||b[i,:]||_2 ||a[:,j]||_2, abs_bound >= the underflow slack). rank: 1 .. 256.
 *
 * Record (optional; rec_idx == NULL skips it): the merge also finds every element whose
 * unmerge (the same call with -scale) would not give its original bits back and stores its
 * flat index i * cols + j in rec_idx (int32: rows * cols must be < 2^31) and its original bits
 * in rec_val (W's dtype). lowrank_*_restore writes them back after the unmerge.
 * The CPU record is a superset: it also holds every element whose round trip the library could
 * not certify, and every one that lowrank_cpu_unmerge_strided (below) would get wrong, so that
 * either unmerge restores W with it; the CUDA record is exactly the failing elements.
 *
 * CPU: records come sorted by index. When more than rec_capacity elements need one, W is left
 * unchanged (bit for bit), *rec_count is set to the number needed and LOWRANK_ERR_CAPACITY is
 * returned: call again with that capacity. The whole buffer is scratch during the call (each
 * thread writes into its share of it), not only its first *rec_count entries. A failed allocation
 * returns LOWRANK_ERR_OUT_OF_MEMORY, with W unchanged bit for bit as well.
 * CUDA: rec_count points to a device int64 that must be zero on entry; it receives the number of
 * records (in no particular order). On overflow W is merged and the record incomplete, so callers
 * pass rec_capacity >= rows * cols (lowrank/ops/merge.py launches blocks of rows to bound that).
 *
 * lowrank_cpu_merge is not called by the Python package (it uses lowrank_cpu_merge_strided below):
 * it is the CPU twin of lowrank_cuda_merge's signature, kept in the ABI for C callers and for the
 * tests, which drive its capacity overflow directly.
 */
int lowrank_cpu_merge(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype, const float *b,
                      const float *a, int64_t rank, const float *row_bound, const float *col_bound,
                      float abs_bound, double scale, int32_t *rec_idx, void *rec_val,
                      int64_t rec_capacity, int64_t *rec_count);
/* The same merge with the factors as they are: b (rows x rank) and a (rank x cols) in
 * factor_dtype with element strides (so transposed views need no copy); the library widens them,
 * rejects NaN / Inf (LOWRANK_ERR_NONFINITE, W untouched) and computes the bounds itself. */
int lowrank_cpu_merge_strided(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                              const void *b, int64_t b_s0, int64_t b_s1, const void *a, int64_t a_s0,
                              int64_t a_s1, int factor_dtype, int64_t rank, double scale,
                              int32_t *rec_idx, void *rec_val, int64_t rec_capacity,
                              int64_t *rec_count);
/* The exact unmerge of a record made by this library's CPU merge (lowrank_cpu_merge_strided or
 * lowrank_cpu_merge, exact) with the same factors and scale (pass the merge's scale): W <- the
 * fp32 round trip of the merge's own accumulation, rounded, no certification; then the record
 * written back. Bit-exact with such a record only -- with any other (a CUDA or pure-torch one)
 * the result is undefined. Record indices are checked before W is written. */
int lowrank_cpu_unmerge_strided(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                                const void *b, int64_t b_s0, int64_t b_s1, const void *a, int64_t a_s0,
                                int64_t a_s1, int factor_dtype, int64_t rank, double scale,
                                const int32_t *rec_idx, const void *rec_val, int64_t rec_count);
/* W[idx[n] / cols, idx[n] % cols] <- val[n] for n < count. */
int lowrank_cpu_restore(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                        const int32_t *rec_idx, const void *rec_val, int64_t count);

int lowrank_cuda_merge(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype, const float *b,
                       const float *a, int64_t rank, const float *row_bound,
                       const float *col_bound, float abs_bound, double scale, int32_t *rec_idx,
                       void *rec_val, int64_t rec_capacity, int64_t *rec_count, void *stream);
/* count is read on the host: pass the number of records. */
int lowrank_cuda_restore(void *w, int64_t rows, int64_t cols, int64_t ldw, int dtype,
                         const int32_t *rec_idx, const void *rec_val, int64_t count, void *stream);

/* ---- DoRA merge / unmerge --------------------------------------------------------------------
 * W (rows x cols, logical; element strides ws0, ws1 with ws1 == 1 (rows contiguous) or ws0 == 1
 * (W is the transpose view of a row-major cols x rows tensor, e.g. a Conv1D weight); dtype code)
 * in place, every element in float64 with one rounding at the end (merge_math.h dora_*_element):
 *     delta = (+0 + b[i,0] a[0,j] + ... + b[i,r-1] a[r-1,j]) * s    (each step a product, then a sum)
 *     merge:   W[i,j] <- round(scale[i] * (W[i,j] + delta))
 *     unmerge: W[i,j] <- round(W[i,j] * inv[i] - delta), then the record written back
 * b: rows x rank, a: rank x cols, float64, contiguous (row-major). scale, inv: float64 (rows,), inv
 * the inverse the unmerge will use (lowrank/ops/dora_merge.py: 1 / scale, 0 where scale is 0).
 * These are the pure-torch path's operations in its order, so the bits are the same.
 *
 * merge: nothing is written when some finite element of W would become Inf or NaN: the call returns
 * LOWRANK_ERR_OVERFLOW with *bad_index = the smallest such flat index i * cols + j (bad_index may
 * be NULL). Record (rec_idx != NULL): every element whose unmerge would not give its bits back,
 * flat index i * cols + j (int32: rows * cols < 2^31) and original bits, sorted by index (CPU);
 * on the CUDA library in no particular order. More than rec_capacity of them: W left unchanged
 * bit for bit, *rec_count = the number needed, LOWRANK_ERR_CAPACITY: call again with that.
 * Every failure (overflow, capacity, out of memory) returns with W unchanged: the checks and the
 * record come from a pass that writes nothing, then a pass that allocates nothing writes W.
 * rank >= 1 (no upper limit). The CUDA entry points take device pointers for the arrays, host
 * pointers for rec_count and bad_index, and synchronize the stream before returning (the overflow
 * and capacity checks run before anything is written). */
int lowrank_cpu_dora_merge(void *w, int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, int dtype,
                           const double *b, const double *a, int64_t rank, double s, const double *scale,
                           const double *inv, int32_t *rec_idx, void *rec_val, int64_t rec_capacity,
                           int64_t *rec_count, int64_t *bad_index);
/* rec_idx / rec_val: the merge's record (count entries, any order; NULL when count is 0). */
int lowrank_cpu_dora_unmerge(void *w, int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, int dtype,
                             const double *b, const double *a, int64_t rank, double s, const double *inv,
                             const int32_t *rec_idx, const void *rec_val, int64_t count);
int lowrank_cuda_dora_merge(void *w, int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, int dtype,
                            const double *b, const double *a, int64_t rank, double s, const double *scale,
                            const double *inv, int32_t *rec_idx, void *rec_val, int64_t rec_capacity,
                            int64_t *rec_count, int64_t *bad_index, void *stream);
int lowrank_cuda_dora_unmerge(void *w, int64_t rows, int64_t cols, int64_t ws0, int64_t ws1, int dtype,
                              const double *b, const double *a, int64_t rank, double s, const double *inv,
                              const int32_t *rec_idx, const void *rec_val, int64_t count, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* LOWRANK_H_ */
