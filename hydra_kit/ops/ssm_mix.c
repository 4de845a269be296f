/* The element-wise stages of the selective SSM's sequence forward and their backward (hydra_kit/ops/ssm_mix.py).
 *
 * As PyTorch ops each stage is several passes over (B, T, C) tensors larger than the caches (a concatenation,
 * K shifted multiply-adds and a SiLU; a multiply-add, a SiLU, a product, a square, a mean and two scalings), so
 * on a CPU they run at memory speed, several times slower than one pass that reads each input once.
 *
 * Layout: a "row" is one token of one sequence. Inputs given with strides (sb, st) are read at
 * base + b * sb + t * st, their channels contiguous, so the column slices of the input projection are read in
 * place. Outputs and gradients are contiguous (B, T, C). Sums over rows accumulate per thread in double, in
 * `scratch` (threads x the sum's size, from the caller, so no allocation can fail here), and are added up after
 * in thread order: with a given thread count every result is the same from run to run. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* exp(x) in a form the compiler vectorises (glibc's expf is a scalar call without -ffast-math, which keeps a loop
 * calling it from vectorising, slower than PyTorch's vectorised passes): x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite,
 * ln2 in two parts), exp(r) by Cephes' degree-7 polynomial, 2^n from the exponent bits: within 1 ulp of the
 * correctly rounded exp at every float of the clamped range.
 * NaN stays NaN; the argument is clamped where 2^n would leave the normal range, which sigmoid and SiLU absorb. */
static inline float exp_vec(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

static inline float sigmoidf(float a) { return 1.0f / (1.0f + exp_vec(-a)); }

/* Inside a parallel region, after every thread has filled its `size` partial sums in `scratch`: add them up in
 * thread order (the same result whatever order the threads finish in) into first[0 .. split) and
 * second[0 .. size - split). */
static void sum_threads(const double *scratch, long size, int team, float *first, long split, float *second) {
#pragma omp for schedule(static)
    for (long i = 0; i < size; i++) {
        double total = 0.0;
        for (int t = 0; t < team; t++) total += scratch[t * size + i];
        if (i < split)
            first[i] += (float)total;
        else
            second[i - split] += (float)total;
    }
}

/* The input of tap k for token t of sequence b: a row of x, or of the carried window before the piece. */
static inline const float *tap_row(const float *x, long sxb, long sxt, const float *state, long b, long t, long back,
                                   long C, long K) {
    const long j = t - back;
    return j >= 0 ? x + b * sxb + j * sxt : state + (b * (K - 1) + (K - 1) + j) * C;
}

/* Whether tap k (reading `back` tokens back) sees its token: not past the document start (offsets may be NULL). */
static inline int tap_open(const long *offsets, long row, long back) { return offsets == NULL || offsets[row] >= back; }

/* a = bias + sum_k w[k] * x[t - (K - 1 - k)] (zeros past a document start), the pre-activation of one row. */
static inline void conv_row(const float *x, long sxb, long sxt, const float *state, const float *wt, const float *bias,
                            const long *offsets, long b, long t, long T, long C, long K, float *a) {
    memcpy(a, bias, (size_t)C * sizeof(float));
    for (long k = 0; k < K; k++) {
        const long back = K - 1 - k;
        if (!tap_open(offsets, b * T + t, back)) continue;
        const float *src = tap_row(x, sxb, sxt, state, b, t, back, C, K), *w = wt + k * C;
#pragma omp simd
        for (long c = 0; c < C; c++) a[c] += w[c] * src[c];
    }
}

/* out = silu(causal depthwise conv of [state; x]): x (B, T, C) strided, state (B, K - 1, C), wt (K, C) the taps
 * transposed (tap K - 1 multiplies the current token), bias (C), offsets (B, T) or NULL, out (B, T, C). */
void hk_conv_silu_forward(const float *x, long sxb, long sxt, const float *state, const float *wt, const float *bias,
                          const long *offsets, float *out, long B, long T, long C, long K) {
#pragma omp parallel for schedule(static)
    for (long row = 0; row < B * T; row++) {
        float *o = out + row * C;
        conv_row(x, sxb, sxt, state, wt, bias, offsets, row / T, row % T, T, C, K, o);
#pragma omp simd
        for (long c = 0; c < C; c++) o[c] = o[c] * sigmoidf(o[c]);
    }
}

/* The backward of hk_conv_silu_forward for the upstream gradient gout (B, T, C). Writes gx (B, T, C), gstate
 * (B, K - 1, C), and adds into gwt (K, C) and gbias (C) (zeroed by the caller); ga (B, T, C) is scratch. */
void hk_conv_silu_backward(const float *x, long sxb, long sxt, const float *state, const float *wt, const float *bias,
                           const long *offsets, const float *gout, float *gx, float *gstate, float *gwt, float *gbias,
                           float *ga, double *scratch, long threads, long B, long T, long C, long K) {
#pragma omp parallel num_threads(threads)
    {
        double *acc = scratch + (long)omp_get_thread_num() * (K + 1) * C;  /* this thread's gwt rows, then gbias */
        memset(acc, 0, (size_t)(K + 1) * C * sizeof(double));
#pragma omp for schedule(static)
        for (long row = 0; row < B * T; row++) {
            const long b = row / T, t = row % T;
            float *g = ga + row * C;
            const float *go = gout + row * C;
            conv_row(x, sxb, sxt, state, wt, bias, offsets, b, t, T, C, K, g);
#pragma omp simd
            for (long c = 0; c < C; c++) {
                const float s = sigmoidf(g[c]);
                g[c] = go[c] * s * (1.0f + g[c] * (1.0f - s));
            }
            for (long c = 0; c < C; c++) acc[K * C + c] += g[c];
            for (long k = 0; k < K; k++) {
                const long back = K - 1 - k;
                if (!tap_open(offsets, row, back)) continue;
                const float *src = tap_row(x, sxb, sxt, state, b, t, back, C, K);
                double *gw = acc + k * C;
                for (long c = 0; c < C; c++) gw[c] += (double)g[c] * src[c];
            }
        }
        sum_threads(scratch, (K + 1) * C, omp_get_num_threads(), gwt, K * C, gbias);
        /* Each input row j (the window's K - 1 rows first) gathers from the tokens whose taps read it. */
#pragma omp for schedule(static)
        for (long r = 0; r < B * (T + K - 1); r++) {
            const long b = r / (T + K - 1), j = r % (T + K - 1) - (K - 1);
            float *gi = j >= 0 ? gx + (b * T + j) * C : gstate + (b * (K - 1) + (K - 1) + j) * C;
            memset(gi, 0, (size_t)C * sizeof(float));
            for (long k = 0; k < K; k++) {
                const long back = K - 1 - k, t = j + back;
                if (t < 0 || t >= T || !tap_open(offsets, b * T + t, back)) continue;
                const float *g = ga + (b * T + t) * C, *w = wt + k * C;
#pragma omp simd
                for (long c = 0; c < C; c++) gi[c] += g[c] * w[c];
            }
        }
    }
}

/* out = rmsnorm((y + d * xs) * silu(z)) * w, normalised over each of `groups` equal groups of the n channels.
 * y, xs, z (B, T, n) strided; d, w (n); out (B, T, n); rstd (B, T, groups) the reciprocal RMS, kept for backward. */
void hk_gated_norm_forward(const float *y, long syb, long syt, const float *xs, long sxb, long sxt, const float *z,
                           long szb, long szt, const float *d, const float *w, float eps, long groups, float *out,
                           float *rstd, long B, long T, long n) {
    const long gn = n / groups;
#pragma omp parallel for schedule(static)
    for (long row = 0; row < B * T; row++) {
        const long b = row / T, t = row % T;
        const float *yr = y + b * syb + t * syt, *xr = xs + b * sxb + t * sxt, *zr = z + b * szb + t * szt;
        float *o = out + row * n;
        for (long grp = 0; grp < groups; grp++) {
            const long lo = grp * gn;
            float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
            for (long c = lo; c < lo + gn; c++) {
                const float g = (yr[c] + d[c] * xr[c]) * zr[c] * sigmoidf(zr[c]);
                o[c] = g;
                sq += g * g;
            }
            const float r = 1.0f / sqrtf(sq / (float)gn + eps);
            rstd[row * groups + grp] = r;
#pragma omp simd
            for (long c = lo; c < lo + gn; c++) o[c] *= r * w[c];
        }
    }
}

/* The backward of hk_gated_norm_forward for gout (B, T, n): writes gy, gxs, gz (B, T, n) and adds into gd, gw (n)
 * (zeroed by the caller). */
void hk_gated_norm_backward(const float *y, long syb, long syt, const float *xs, long sxb, long sxt, const float *z,
                            long szb, long szt, const float *d, const float *w, const float *rstd, long groups,
                            const float *gout, float *gy, float *gxs, float *gz, float *gd, float *gw, double *scratch,
                            long threads, long B, long T, long n) {
    const long gn = n / groups;
#pragma omp parallel num_threads(threads)
    {
        double *acc = scratch + (long)omp_get_thread_num() * 2 * n;  /* this thread's gd, then gw */
        memset(acc, 0, (size_t)2 * n * sizeof(double));
#pragma omp for schedule(static)
        for (long row = 0; row < B * T; row++) {
            const long b = row / T, t = row % T;
            const float *yr = y + b * syb + t * syt, *xr = xs + b * sxb + t * sxt, *zr = z + b * szb + t * szt;
            const float *go = gout + row * n;
            float *gyr = gy + row * n, *gxr = gxs + row * n, *gzr = gz + row * n;
            for (long grp = 0; grp < groups; grp++) {
                const long lo = grp * gn;
                const float r = rstd[row * groups + grp];
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (long c = lo; c < lo + gn; c++) {
                    const float g = (yr[c] + d[c] * xr[c]) * zr[c] * sigmoidf(zr[c]);
                    dot += go[c] * w[c] * g;
                }
                const float coef = r * r * r * dot / (float)gn;
#pragma omp simd
                for (long c = lo; c < lo + gn; c++) {
                    const float v = yr[c] + d[c] * xr[c], s = sigmoidf(zr[c]), silu = zr[c] * s;
                    const float g = v * silu, gg = r * w[c] * go[c] - coef * g, gv = gg * silu;
                    gyr[c] = gv;
                    gxr[c] = gv * d[c];
                    gzr[c] = gg * v * s * (1.0f + zr[c] * (1.0f - s));
                    acc[c] += (double)gv * xr[c];
                    acc[n + c] += (double)go[c] * g * r;
                }
            }
        }
        sum_threads(scratch, 2 * n, omp_get_num_threads(), gd, n, gw);
    }
}
