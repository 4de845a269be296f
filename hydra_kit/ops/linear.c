/* y = x W^T + b for a few rows x: the matrix-vector products of one-token decoding (hydra_kit/ops/linear.py).
 *
 * W is an nn.Linear weight, (out, in) row-major. The threads split the output features, so each streams one
 * contiguous block of W exactly once; every row of x (a few KB) stays in L1 while a row of W is read. */

#include <stddef.h>

void hk_linear(const float *x, const float *w, const float *bias, float *y, long rows, long n_in, long n_out) {
    /* Forking threads costs more than a matrix of a few KB takes to read. */
#pragma omp parallel for schedule(static) if (n_in * n_out >= 65536)
    for (long o = 0; o < n_out; o++) {
        const float *wo = w + o * n_in;
        for (long r = 0; r < rows; r++) {
            const float *xr = x + r * n_in;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (long i = 0; i < n_in; i++) s += wo[i] * xr[i];
            y[r * n_out + o] = bias ? s + bias[o] : s;
        }
    }
}
