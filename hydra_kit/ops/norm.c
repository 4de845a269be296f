/* RMSNorm of a few rows: y = x / sqrt(mean(x^2) + eps) * w (hydra_kit/ops/norm.py, rms_norm).
 * One-token decoding normalises one row per block, where F.rms_norm's fixed cost is many times this loop's. */

#include <math.h>

void hk_rms_norm(const float *x, const float *w, float *y, long rows, long dim, float eps) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim, sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (long i = 0; i < dim; i++) sq += xr[i] * xr[i];
        const float scale = 1.0f / sqrtf(sq / (float)dim + eps);
#pragma omp simd
        for (long i = 0; i < dim; i++) yr[i] = xr[i] * scale * w[i];
    }
}
