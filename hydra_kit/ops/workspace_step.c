/* The workspace memory's read of one token per sequence, in one call (WorkspaceMemory.step, components/workspace.py):
 *   q = W_query x;   repeat `hops` times: r = softmax(q K^T / sqrt(Ds)) V,  q = q + W_hop r;   y = W_out r
 * with the slots' read keys K and values V (S, Ds) as cached in the state (read_kv: K then V per slot). The
 * last hop's query update is not computed: nothing reads it. Threads split the rows of each projection; the
 * attention over a handful of slots runs on one. */

#include <math.h>

static inline float dot(const float *a, const float *b, long n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

void hk_workspace_read(const float *x,       /* (B, D) */
                       const float *w_query, /* (Ds, D) */
                       const float *read_kv, /* (B, S, 2 Ds) */
                       const float *w_hop,   /* (Ds, Ds) */
                       const float *w_out,   /* (D, Ds) */
                       float *out,           /* (B, D) */
                       float *scratch,       /* (2 Ds + S) */
                       long batch, long d_model, long d_slot, long n_slots, long hops) {
    float *q = scratch, *r = q + d_slot, *p = r + d_slot;
    const float scale = 1.0f / sqrtf((float)d_slot);
    for (long b = 0; b < batch; b++) {
        const float *kv = read_kv + b * n_slots * 2 * d_slot;
#pragma omp parallel
        {
#pragma omp for schedule(static)
            for (long i = 0; i < d_slot; i++) q[i] = dot(w_query + i * d_model, x + b * d_model, d_model);
            for (long hop = 0; hop < hops; hop++) {
#pragma omp single
                {
                    float peak = -INFINITY, total = 0.0f;
                    for (long s = 0; s < n_slots; s++) {
                        p[s] = scale * dot(q, kv + s * 2 * d_slot, d_slot);
                        peak = p[s] > peak ? p[s] : peak;
                    }
                    for (long s = 0; s < n_slots; s++) total += p[s] = expf(p[s] - peak);
                    for (long i = 0; i < d_slot; i++) r[i] = 0.0f;
                    for (long s = 0; s < n_slots; s++) {
                        const float w = p[s] / total, *v = kv + s * 2 * d_slot + d_slot;
#pragma omp simd
                        for (long i = 0; i < d_slot; i++) r[i] += w * v[i];
                    }
                }
                if (hop + 1 < hops) {
#pragma omp for schedule(static)
                    for (long i = 0; i < d_slot; i++) q[i] += dot(w_hop + i * d_slot, r, d_slot);
                }
            }
#pragma omp for schedule(static)
            for (long o = 0; o < d_model; o++) out[b * d_model + o] = dot(w_out + o * d_slot, r, d_slot);
        }
    }
}
