/* Attention of one query per (sequence, head) over one or more sets of cached keys and values.
 *
 * out[b, h] = sum_t p_t v_t with p = softmax_t(scale * q[b, h] . k_t) over the unmasked keys of every set: the
 * decoding step of dense attention (one set: the key/value cache) and of sparse global attention (the window,
 * the new token, the globals). Three passes per (b, h): the scores (streaming the keys once), their exponentials
 * (a vectorised loop over a buffer in cache), the weighted sum of the values (streaming the values once).
 * Threads split the (b, h) pairs. A set's keys and values share one layout, given by strides in floats. */

#include <math.h>
#include <stddef.h>

void hk_decode_attention(const float *q,                    /* (B, H, hd) */
                         float *out,                        /* (B, H, hd) */
                         float *scores,                     /* scratch (B * H * total keys) */
                         long batch, long heads, long head_dim, float scale, long n_sets,
                         const float *const *keys,          /* per set: address of key (0, 0, 0) */
                         const float *const *values,        /* per set: address of value (0, 0, 0) */
                         const long *lengths,               /* per set: number of keys */
                         const long *strides,               /* per set: batch, head and key strides */
                         const unsigned char *const *masks, /* per set: (B, n) visible keys, or NULL: all */
                         long total) {
#pragma omp parallel for schedule(static)
    for (long bh = 0; bh < batch * heads; bh++) {
        const long b = bh / heads, h = bh % heads;
        const float *qv = q + bh * head_dim;
        float *s = scores + bh * total, peak = -INFINITY;
        for (long set = 0, at = 0; set < n_sets; at += lengths[set], set++) {
            const float *k = keys[set] + b * strides[3 * set] + h * strides[3 * set + 1];
            const long step = strides[3 * set + 2];
            const unsigned char *mask = masks[set] ? masks[set] + b * lengths[set] : NULL;
            for (long t = 0; t < lengths[set]; t++) {
                float dot = -INFINITY;
                if (!mask || mask[t]) {
                    const float *kt = k + t * step;
                    dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (long d = 0; d < head_dim; d++) dot += qv[d] * kt[d];
                    dot *= scale;
                }
                s[at + t] = dot;
                peak = dot > peak ? dot : peak;
            }
        }
        float *o = out + bh * head_dim;
        for (long d = 0; d < head_dim; d++) o[d] = 0.0f;
        if (peak == -INFINITY) continue; /* nothing visible: a zero output rather than NaN */
        float norm = 0.0f;
#pragma omp simd reduction(+ : norm)
        for (long t = 0; t < total; t++) {
            s[t] = expf(s[t] - peak); /* a masked key's -inf gives 0 */
            norm += s[t];
        }
        for (long set = 0, at = 0; set < n_sets; at += lengths[set], set++) {
            const float *v = values[set] + b * strides[3 * set] + h * strides[3 * set + 1];
            const long step = strides[3 * set + 2];
            for (long t = 0; t < lengths[set]; t++) {
                const float p = s[at + t];
                if (p == 0.0f) continue;
                const float *vt = v + t * step;
#pragma omp simd
                for (long d = 0; d < head_dim; d++) o[d] += p * vt[d];
            }
        }
        for (long d = 0; d < head_dim; d++) o[d] /= norm;
    }
}
