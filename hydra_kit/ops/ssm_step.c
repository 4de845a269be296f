/* One decoding step of the Mamba-2 (SSD) selective SSM, both projections included, in one call.
 *
 * The PyTorch reference is SelectiveSSM.step (components/ssm.py), which this must match: per sequence b,
 *   proj:   (z, x B C, dt) = W_in u
 *   conv:   xbc = silu(bias + sum_j w[c, j] * window[j, c]), window = (last d_conv - 1 inputs, this input)
 *   dt:     dt_h = softplus(dt_h + dt_bias_h), decay_h = exp(-dt_h * exp(A_log_h))
 *   state:  S_h[p, n] = decay_h * S_h[p, n] + dt_h * x[h, p] * B[g(h), n]
 *   output: y[h, p] = sum_n S_h[p, n] * C[g(h), n] + D_h * x[h, p]
 *   norm:   g = rmsnorm(y * silu(z)) * norm_weight, per group of d_inner / norm_groups channels
 *   out:    W_out g.
 * The new conv window and SSM state go to fresh buffers: the state passed in is left as it was. One parallel
 * region per sequence: the threads split the rows of each projection (each streams its block of the weight
 * once, as in hydra_kit/ops/linear.c), the channels of the conv and the heads of the state update. */

#include <math.h>
#include <stddef.h>

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* torch.nn.functional.softplus with beta 1 and threshold 20 */
static inline float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

static inline float dot(const float *a, const float *b, long n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void hk_ssm_step(const float *u,                /* (B, D) the normalised block input */
                 const float *const *params,    /* w_in (d_inner + conv_dim + H, D), w_out (D, d_inner), conv_w (conv_dim, K),
                                                   conv_b (conv_dim), dt_bias (H), a_log (H), d_skip (H), norm_w (d_inner) */
                 const long *dims,              /* d_inner, conv_dim, H, P, N, groups, K (d_conv), norm groups, D */
                 float eps,
                 const float *conv_in,          /* (B, K - 1, conv_dim) */
                 const float *ssm_in,           /* (B, H, P, N) */
                 float *out,                    /* (B, D) the update */
                 float *conv_out,               /* (B, K - 1, conv_dim) */
                 float *ssm_out,                /* (B, H, P, N) */
                 float *scratch,                /* (2 (d_inner + conv_dim) + H) */
                 long batch) {
    const float *w_in = params[0], *w_out = params[1], *conv_w = params[2], *conv_b = params[3];
    const float *dt_bias = params[4], *a_log = params[5], *d_skip = params[6], *norm_w = params[7];
    const long d_inner = dims[0], conv_dim = dims[1], heads = dims[2], headdim = dims[3], d_state = dims[4];
    const long groups = dims[5], d_conv = dims[6], norm_groups = dims[7], d_model = dims[8];
    /* scratch: the projection (z, x B C, dt), the gated output, the conv output */
    float *proj = scratch, *gated = proj + d_inner + conv_dim + heads, *act = gated + d_inner;
    const long width = d_inner + conv_dim + heads, heads_per_group = heads / groups;
    const long group_width = d_inner / norm_groups;
    for (long b = 0; b < batch; b++) {
        const float *z = proj, *xbc = z + d_inner, *dt = xbc + conv_dim, *ub = u + b * d_model;
        const float *window = conv_in + b * (d_conv - 1) * conv_dim;
        float *window_out = conv_out + b * (d_conv - 1) * conv_dim, *o = gated;
        const float *xs = act, *bmat = act + d_inner, *cmat = bmat + groups * d_state;
#pragma omp parallel
        {
#pragma omp for schedule(static)
            for (long r = 0; r < width; r++) proj[r] = dot(w_in + r * d_model, ub, d_model);
#pragma omp for schedule(static)
            for (long c = 0; c < conv_dim; c++) {
                const float *wc = conv_w + c * d_conv;
                float v = conv_b[c] + wc[d_conv - 1] * xbc[c];
                for (long j = 0; j < d_conv - 1; j++) v += wc[j] * window[j * conv_dim + c];
                act[c] = silu(v);
                for (long j = 0; j + 1 < d_conv - 1; j++) window_out[j * conv_dim + c] = window[(j + 1) * conv_dim + c];
                if (d_conv > 1) window_out[(d_conv - 2) * conv_dim + c] = xbc[c];
            }
#pragma omp for schedule(static)
            for (long h = 0; h < heads; h++) {
                const float step = softplus(dt[h] + dt_bias[h]);
                const float decay = expf(step * -expf(a_log[h]));
                const long g = h / heads_per_group;
                const float *bg = bmat + g * d_state, *cg = cmat + g * d_state;
                for (long p = 0; p < headdim; p++) {
                    const long row = h * headdim + p;
                    const float *s_in = ssm_in + (b * heads * headdim + row) * d_state;
                    float *s_out = ssm_out + (b * heads * headdim + row) * d_state;
                    const float u = xs[row] * step;
                    float y = 0.0f;
#pragma omp simd reduction(+ : y)
                    for (long n = 0; n < d_state; n++) {
                        const float s = s_in[n] * decay + u * bg[n];
                        s_out[n] = s;
                        y += s * cg[n];
                    }
                    o[row] = (y + d_skip[h] * xs[row]) * silu(z[row]); /* gated, normalised below */
                }
            }
#pragma omp single
            for (long g = 0; g < norm_groups; g++) {
                float *og = o + g * group_width;
                const float scale = 1.0f / sqrtf(dot(og, og, group_width) / (float)group_width + eps);
                for (long i = 0; i < group_width; i++) og[i] = og[i] * scale * norm_w[g * group_width + i];
            }
#pragma omp for schedule(static)
            for (long r = 0; r < d_model; r++) out[b * d_model + r] = dot(w_out + r * d_inner, o, d_inner);
        }
    }
}
