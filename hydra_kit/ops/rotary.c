/* Query, key and value of one token per sequence, rotary embedding included, in one call.
 *
 * out[b] = (W x_b) for the rows of W_a followed by the rows of W_b (the caller's layout: rows of queries, then
 * keys, then values, each H heads of hd), and the first 2 * H * hd rows (queries and keys) rotated by RoPE at
 * absolute position pos: per head, pairs (i, i + hd/2) turn by pos * inv_freq[i] (hydra_kit/ops/rotary.py).
 * Given destinations, the keys and values are also written there (a slot of a key/value cache, in any layout
 * with contiguous heads), which saves the caller two indexing copies per step. */

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float dot(const float *a, const float *b, long n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void hk_qkv_rotary(const float *x,        /* (B, D) */
                   const float *w_a,      /* (rows_a, D) */
                   const float *w_b,      /* (rows_b, D) or NULL */
                   const float *inv_freq, /* (hd / 2) */
                   float *out,            /* (B, rows_a + rows_b) */
                   long batch, long d_model, long rows_a, long rows_b, long heads, long head_dim, long pos,
                   const int64_t *dst) {  /* NULL, or the addresses of key (0, 0) and value (0, 0) of (B, H, hd)
                                             destinations and their batch and head strides in floats */
    const long rows = rows_a + rows_b, half = head_dim / 2;
    /* One table for every head and sequence. The angle is rounded to float as in rotary.py; its cosine is taken
     * in double, because float cosf/sinf of arguments in the thousands (long contexts) take a slow exact-
     * reduction path, about 100x the cost of the double functions. */
    float cos_t[512], sin_t[512]; /* rotary.py sends head widths above 1024 to the PyTorch path */
    for (long i = 0; i < half; i++) {
        const float angle = (float)pos * inv_freq[i];
        cos_t[i] = (float)cos((double)angle);
        sin_t[i] = (float)sin((double)angle);
    }
    for (long b = 0; b < batch; b++) {
        const float *xb = x + b * d_model;
        float *ob = out + b * rows;
#pragma omp parallel
        {
            /* Two loops, not one with a choice of matrix per row: GCC vectorises that form 6x worse. */
#pragma omp for schedule(static) nowait
            for (long r = 0; r < rows_a; r++) ob[r] = dot(w_a + r * d_model, xb, d_model);
#pragma omp for schedule(static)
            for (long r = 0; r < rows_b; r++) ob[rows_a + r] = dot(w_b + r * d_model, xb, d_model);
#pragma omp for schedule(static)
            for (long h = 0; h < 2 * heads; h++) {
                float *v = ob + h * head_dim;
                for (long i = 0; i < half; i++) {
                    const float c = cos_t[i], s = sin_t[i], x1 = v[i], x2 = v[i + half];
                    v[i] = x1 * c - x2 * s;
                    v[i + half] = x2 * c + x1 * s;
                }
            }
            if (dst) {
#pragma omp for schedule(static)
                for (long h = 0; h < 2 * heads; h++) { /* keys, then values */
                    const long which = h / heads, head = h % heads;
                    float *to = (float *)(intptr_t)dst[which] + b * dst[2 + 2 * which] + head * dst[3 + 2 * which];
                    memcpy(to, ob + (heads + h) * head_dim, (size_t)head_dim * sizeof(float));
                }
            }
        }
    }
}
