/* Attention of one query per (sequence, head) over one or more sets of cached keys and values.
 *
 * out[b, h] = sum_t p_t v_t with p = softmax_t(scale * q[b, h] . k_t) over the unmasked keys of every set: the
 * decoding step of dense attention (one set: the key/value cache) and of sparse global attention (the window,
 * the new token, the globals). A set's keys and values share one layout, given by strides in floats. Two ways to
 * split the work between threads, chosen by the layout so that each thread reads memory front to back:
 *
 * - hk_attention_by_head, for head-major caches ((B, H, n, hd): the keys of one head side by side, as in dense
 *   attention's cache): one (sequence, head) per work item, three passes: the scores (streaming the keys once),
 *   their exponentials, the weighted sum of the values (streaming the values once).
 * - hk_attention_by_key, for key-major caches ((B, n, H, hd): all heads of a key side by side, as in SGA's window
 *   and globals): split-K, as in flash-decoding. A work item is a tile of keys of one set and one sequence, for
 *   every head, read one contiguous row per key; a second pass rescales the tiles' partial sums to the maximum
 *   over all tiles and divides by the total weight. Splitting such a cache by heads made each thread read
 *   256-byte pieces 2 KB apart, far below the memory's speed (docs/benchmarks.md).
 *
 * A (sequence, head) that sees no key gets zeros rather than NaN. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* A set of keys is described by SET_FIELDS integers: the addresses of key (0, 0, 0) and of value (0, 0, 0), the
 * number of keys, the batch, head and key strides in floats, and the address of a (B, n) byte mask of visible
 * keys (0: all visible). */
#define SET_FIELDS 7
#define KEYS(set) ((const float *)(intptr_t)sets[SET_FIELDS * (set)])
#define VALUES(set) ((const float *)(intptr_t)sets[SET_FIELDS * (set) + 1])
#define LENGTH(set) ((long)sets[SET_FIELDS * (set) + 2])
#define STRIDE(set, i) ((long)sets[SET_FIELDS * (set) + 3 + (i)])
#define MASK(set) ((const unsigned char *)(intptr_t)sets[SET_FIELDS * (set) + 6])

static inline float dot(const float *a, const float *b, long n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* o += p * v over one head's features */
static inline void accumulate(float *restrict o, float p, const float *restrict v, long n) {
#pragma omp simd
    for (long d = 0; d < n; d++) o[d] += p * v[d];
}

static inline long tiles(long n, long tile) { return (n + tile - 1) / tile; }

void hk_attention_by_head(const float *q,                    /* (B, H, hd) */
                          float *out,                        /* (B, H, hd) */
                          float *scores,                     /* scratch (B * H * total keys) */
                          long batch, long heads, long head_dim, float scale, long n_sets,
                          const int64_t *sets,               /* n_sets x SET_FIELDS */
                          long total) {
#pragma omp parallel for schedule(static)
    for (long bh = 0; bh < batch * heads; bh++) {
        const long b = bh / heads, h = bh % heads;
        const float *qv = q + bh * head_dim;
        float *s = scores + bh * total, peak = -INFINITY;
        for (long set = 0, at = 0; set < n_sets; at += LENGTH(set), set++) {
            const float *k = KEYS(set) + b * STRIDE(set, 0) + h * STRIDE(set, 1);
            const long step = STRIDE(set, 2);
            const unsigned char *mask = MASK(set) ? MASK(set) + b * LENGTH(set) : NULL;
            for (long t = 0; t < LENGTH(set); t++) {
                const float score = !mask || mask[t] ? scale * dot(qv, k + t * step, head_dim) : -INFINITY;
                s[at + t] = score;
                peak = score > peak ? score : peak;
            }
        }
        float *o = out + bh * head_dim;
        for (long d = 0; d < head_dim; d++) o[d] = 0.0f;
        if (peak == -INFINITY) continue;
        float norm = 0.0f;
#pragma omp simd reduction(+ : norm)
        for (long t = 0; t < total; t++) {
            s[t] = expf(s[t] - peak); /* a masked key's -inf gives 0 */
            norm += s[t];
        }
        for (long set = 0, at = 0; set < n_sets; at += LENGTH(set), set++) {
            const float *v = VALUES(set) + b * STRIDE(set, 0) + h * STRIDE(set, 1);
            const long step = STRIDE(set, 2);
            for (long t = 0; t < LENGTH(set); t++)
                if (s[at + t] != 0.0f) accumulate(o, s[at + t], v + t * step, head_dim);
        }
        for (long d = 0; d < head_dim; d++) o[d] /= norm;
    }
}

void hk_attention_by_key(const float *q,                    /* (B, H, hd) */
                         float *out,                        /* (B, H, hd) */
                         float *scratch,                    /* (B * tiles_per_sequence * H * (2 + hd + tile)) */
                         long batch, long heads, long head_dim, float scale, long n_sets,
                         const int64_t *sets,               /* n_sets x SET_FIELDS */
                         long tile,                         /* keys per work item */
                         long tiles_per_sequence) {
    const long item_floats = heads * (2 + head_dim + tile); /* per item: maxima, weight sums, outputs, scores */
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (long item = 0; item < batch * tiles_per_sequence; item++) {
            const long b = item / tiles_per_sequence;
            long at = item % tiles_per_sequence, set = 0;
            while (at >= tiles(LENGTH(set), tile)) at -= tiles(LENGTH(set), tile), set++;
            const long first = at * tile, n = LENGTH(set) - first < tile ? LENGTH(set) - first : tile;
            const long head_stride = STRIDE(set, 1), key_stride = STRIDE(set, 2);
            const float *k = KEYS(set) + b * STRIDE(set, 0) + first * key_stride;
            const float *v = VALUES(set) + b * STRIDE(set, 0) + first * key_stride;
            const unsigned char *mask = MASK(set) ? MASK(set) + b * LENGTH(set) + first : NULL;
            float *peak = scratch + item * item_floats, *weight = peak + heads, *o = weight + heads;
            float *s = o + heads * head_dim; /* (H, tile) */
            const float *qb = q + b * heads * head_dim;
            for (long h = 0; h < heads; h++) peak[h] = -INFINITY;
            for (long t = 0; t < n; t++) {
                const float *kt = k + t * key_stride;
                const int visible = !mask || mask[t];
                for (long h = 0; h < heads; h++) {
                    const float score = visible ? scale * dot(qb + h * head_dim, kt + h * head_stride, head_dim) : -INFINITY;
                    s[h * tile + t] = score;
                    peak[h] = score > peak[h] ? score : peak[h];
                }
            }
            for (long h = 0; h < heads; h++) {
                float total = 0.0f, *sh = s + h * tile;
                const float top = peak[h] == -INFINITY ? 0.0f : peak[h]; /* all masked: every exp(-inf) is 0 */
#pragma omp simd reduction(+ : total)
                for (long t = 0; t < n; t++) {
                    sh[t] = expf(sh[t] - top);
                    total += sh[t];
                }
                weight[h] = total;
            }
            for (long i = 0; i < heads * head_dim; i++) o[i] = 0.0f;
            for (long t = 0; t < n; t++) {
                if (mask && !mask[t]) continue;
                const float *vt = v + t * key_stride;
                for (long h = 0; h < heads; h++) accumulate(o + h * head_dim, s[h * tile + t], vt + h * head_stride, head_dim);
            }
        }
#pragma omp for schedule(static)
        for (long bh = 0; bh < batch * heads; bh++) {
            const long b = bh / heads, h = bh % heads;
            const float *items = scratch + b * tiles_per_sequence * item_floats;
            float top = -INFINITY, total = 0.0f, *ob = out + bh * head_dim;
            for (long i = 0; i < tiles_per_sequence; i++) top = items[i * item_floats + h] > top ? items[i * item_floats + h] : top;
            for (long d = 0; d < head_dim; d++) ob[d] = 0.0f;
            if (top == -INFINITY) continue;
            for (long i = 0; i < tiles_per_sequence; i++) {
                const float *it = items + i * item_floats;
                if (it[h] == -INFINITY) continue;
                const float rescale = expf(it[h] - top);
                const float *oh = it + 2 * heads + h * head_dim;
                total += rescale * it[heads + h];
#pragma omp simd
                for (long d = 0; d < head_dim; d++) ob[d] += rescale * oh[d];
            }
            for (long d = 0; d < head_dim; d++) ob[d] /= total;
        }
    }
}
