/* One token through a top-k mixture of SwiGLU experts, routing included, in one call.
 *
 * The PyTorch reference is the single-sequence path of MixtureOfExperts.step (components/moe.py):
 *   p = softmax(W_router x); the k largest p (in decreasing order) pick the experts, weighted p_j / sum p;
 *   y = sum_j down_e(w_j * silu(gate_e x) * up_e x), summed in the order of the picks.
 * Each expert is an (2F, D) gate_up and a (D, F) down weight, row-major, passed as arrays of addresses. */

#include <math.h>
#include <stddef.h>

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static inline float dot(const float *a, const float *b, long n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void hk_moe_step(const float *x,              /* (D) */
                 const float *router_w,       /* (E, D) */
                 const float *const *gate_up, /* E addresses of (2F, D) */
                 const float *const *down,    /* E addresses of (D, F) */
                 float *y,                    /* (D) output */
                 long *chosen,                /* (k) output: the experts, in decreasing probability */
                 float *scratch,              /* (E + k F) */
                 long n_experts, long d_model, long hidden, long top_k) {
    float *probs = scratch, *h = scratch + n_experts;
    float peak = -INFINITY, total = 0.0f;
    for (long e = 0; e < n_experts; e++) {
        probs[e] = dot(router_w + e * d_model, x, d_model);
        peak = probs[e] > peak ? probs[e] : peak;
    }
    for (long e = 0; e < n_experts; e++) total += probs[e] = expf(probs[e] - peak);
    float picked = 0.0f, weights[64];
    for (long j = 0; j < top_k; j++) { /* the j-th largest probability; ties go to the lower index */
        long best = -1;
        for (long e = 0; e < n_experts; e++) {
            int taken = 0;
            for (long i = 0; i < j; i++) taken |= chosen[i] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        chosen[j] = best;
        weights[j] = probs[best] / total;
        picked += weights[j];
    }
    /* All k experts in one parallel region of two phases, so each phase has k experts' rows in flight: first
     * every hidden unit of every pick, then every output summed over the picks in their order. */
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (long jf = 0; jf < top_k * hidden; jf++) {
            const long j = jf / hidden, f = jf % hidden;
            const float *gu = gate_up[chosen[j]];
            const float gate = dot(gu + f * d_model, x, d_model), up = dot(gu + (hidden + f) * d_model, x, d_model);
            h[jf] = silu(gate) * up * (weights[j] / picked);
        }
#pragma omp for schedule(static)
        for (long o = 0; o < d_model; o++) {
            float sum = 0.0f;
            for (long j = 0; j < top_k; j++) sum += dot(down[chosen[j]] + o * hidden, h + j * hidden, hidden);
            y[o] = sum;
        }
    }
}
