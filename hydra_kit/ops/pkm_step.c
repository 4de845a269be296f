/* One token per sequence through the product-key memory, in one call (ProductKeyMemory.forward, components/pkm.py):
 *   q_h = layernorm(W_q x)_h * gain_h + bias_h                   per head h, split into halves (q1, q2)
 *   the k best sub-keys of each half (s1 = q1 . K1, s2 = q2 . K2), then the k best of the candidate pairs
 *   (rows[i], cols[i]) by s1 + s2: the exact top-k of the n_keys^2 product keys (candidate_pairs in pkm.py)
 *   y = sum_h sum_j softmax_j(score_hj) * V[slot_hj]             slot = i1 * n_keys + i2
 * Selection keeps the larger score and, between equal scores, the lower index. Output projection (if any) is
 * the caller's. Scratch per call: heads * (d_key + 2 * n_keys + 2 * k + n_candidates + d_value) floats and
 * heads * 3 * k longs. Threads split the query projection's rows, then the heads. Returns 1, having read nothing
 * else, when a candidate pair points outside the k-lists (pkm_step.py raises); 0 when done. */

#include <math.h>

static inline float dot(const float *a, const float *b, long n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

#define MAX_SELECT 4096 /* pkm_step.py sends n_keys and candidate counts above this to the PyTorch path */

/* The k largest of v[0..n) in decreasing order, equal values by increasing index: their values and indices.
 * One pass keeping the best so far in a sorted list: about n comparisons, where repeated argmax took n * k. */
static void top_k(const float *v, long n, long k, float *best, long *index) {
    long kept = 0;
    for (long i = 0; i < n; i++) {
        if (kept == k && !(v[i] > best[k - 1])) continue; /* an equal value with a higher index loses */
        long at = kept < k ? kept++ : k - 1;
        for (; at > 0 && v[i] > best[at - 1]; at--) { /* shift the smaller ones down */
            best[at] = best[at - 1];
            index[at] = index[at - 1];
        }
        best[at] = v[i];
        index[at] = i;
    }
}

int hk_pkm_step(const float *x,         /* (B, D) */
                const float *w_query,   /* (H * dk, D) */
                const float *gain,      /* (H, dk) */
                const float *bias,      /* (H, dk) */
                const float *sub_keys,  /* (H, 2, n_keys, dk / 2) */
                const float *values,    /* (n_keys^2, d_value) */
                const long *rows,       /* (P) */
                const long *cols,       /* (P) */
                float *out,             /* (B, d_value) */
                float *scratch, long *index_scratch, long batch, long d_model, long heads, long d_key,
                long n_keys, long k, long n_candidates, long d_value, float eps) {
    const long half = d_key / 2, per_head = d_key + 2 * n_keys + 2 * k + n_candidates + d_value;
    /* The pairs index the k best of each half: checked once per call, not trusted (they come from a buffer). */
    for (long c = 0; c < n_candidates; c++)
        if (rows[c] < 0 || rows[c] >= k || cols[c] < 0 || cols[c] >= k) return 1;
    for (long b = 0; b < batch; b++) {
        const float *xb = x + b * d_model;
        float *yb = out + b * d_value;
#pragma omp parallel
        {
            /* The query projection, rows split between the threads (the largest read). */
#pragma omp for schedule(static)
            for (long r = 0; r < heads * d_key; r++) scratch[(r / d_key) * per_head + r % d_key] = dot(w_query + r * d_model, xb, d_model);
            /* Heads in parallel: each normalises its query, selects its k slots and sums their values on its own. */
#pragma omp for schedule(static)
            for (long h = 0; h < heads; h++) {
                float *q = scratch + h * per_head, *s1 = q + d_key, *s2 = s1 + n_keys, *best1 = s2 + n_keys;
                float *best2 = best1 + k, *cand = best2 + k, *part = cand + n_candidates;
                long *idx1 = index_scratch + h * 3 * k, *idx2 = idx1 + k, *pick = idx2 + k;
                float mean = 0.0f, var = 0.0f;
                for (long d = 0; d < d_key; d++) mean += q[d];
                mean /= (float)d_key;
                for (long d = 0; d < d_key; d++) var += (q[d] - mean) * (q[d] - mean);
                const float inv = 1.0f / sqrtf(var / (float)d_key + eps);
                for (long d = 0; d < d_key; d++) q[d] = (q[d] - mean) * inv * gain[h * d_key + d] + bias[h * d_key + d];
                const float *k1 = sub_keys + h * 2 * n_keys * half, *k2 = k1 + n_keys * half;
                for (long i = 0; i < n_keys; i++) {
                    s1[i] = dot(q, k1 + i * half, half);
                    s2[i] = dot(q + half, k2 + i * half, half);
                }
                top_k(s1, n_keys, k, best1, idx1);
                top_k(s2, n_keys, k, best2, idx2);
                for (long c = 0; c < n_candidates; c++) cand[c] = best1[rows[c]] + best2[cols[c]];
                float *score = s1; /* s1 is no longer needed: reuse it for the k final scores */
                top_k(cand, n_candidates, k, score, pick);
                const float peak = score[0]; /* the selection is in decreasing order */
                float norm = 0.0f;
                for (long j = 0; j < k; j++) { /* start reading every chosen row before summing any */
                    const float *v = values + (idx1[rows[pick[j]]] * n_keys + idx2[cols[pick[j]]]) * d_value;
                    for (long d = 0; d < d_value; d += 16) __builtin_prefetch(v + d);
                }
                for (long j = 0; j < k; j++) norm += score[j] = expf(score[j] - peak);
                for (long d = 0; d < d_value; d++) part[d] = 0.0f;
                for (long j = 0; j < k; j++) {
                    const float *v = values + (idx1[rows[pick[j]]] * n_keys + idx2[cols[pick[j]]]) * d_value;
                    const float p = score[j] / norm;
#pragma omp simd
                    for (long d = 0; d < d_value; d++) part[d] += p * v[d];
                }
            }
            /* The heads' reads are summed, in head order (as the PyTorch path's bag sums them). */
#pragma omp for schedule(static)
            for (long d = 0; d < d_value; d++) {
                float sum = 0.0f;
                for (long h = 0; h < heads; h++) sum += scratch[h * per_head + d_key + 2 * n_keys + 2 * k + n_candidates + d];
                yb[d] = sum;
            }
        }
    }
    return 0;
}
