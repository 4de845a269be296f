/* The gated residual sum of a tri-path block for a few tokens (hydra_kit/block.py, paper eq. 5):
 *   y[b] = x[b] + sum_c g_c * r[b, column_c] * update_c[b]    (r = 1 for a component without a gate column)
 * Decoding adds four to six updates per block; as PyTorch ops that is a slice, a product and an addcmul per
 * update, each with several microseconds of fixed cost. */

#include <stdint.h>

void hk_gated_residual(const float *x,          /* (B, D) */
                       float *y,                /* (B, D) */
                       long batch, long dim, long n,
                       const int64_t *updates,  /* n addresses of (B, D) */
                       const float *gates,      /* (B, G), or NULL when no update has a column */
                       long n_gates,
                       const long *columns,     /* n: the update's gate column, or -1 */
                       const int64_t *scales) { /* n addresses of the LayerScale g (one float each) */
    for (long b = 0; b < batch; b++) {
        float *yb = y + b * dim;
        const float *xb = x + b * dim;
        for (long i = 0; i < dim; i++) yb[i] = xb[i];
        for (long c = 0; c < n; c++) {
            const float *u = (const float *)(intptr_t)updates[c] + b * dim;
            const float g = *(const float *)(intptr_t)scales[c];
            const float s = columns[c] >= 0 ? g * gates[b * n_gates + columns[c]] : g;
#pragma omp simd
            for (long i = 0; i < dim; i++) yb[i] += s * u[i];
        }
    }
}
