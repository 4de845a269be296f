/* The pass of the chunked SSD scan that carries states across chunks, and its backward (hydra_kit/ops/chunk_carry.py):
 *
 *   S_0 = initial,   starts[k] = S_k * out[k],   S_{k+1} = S_k * decay[k] + local[k] * in[k],   final = S_C,
 *
 * per sequence b and head h, with in, decay, out scalars per (b, chunk, head) and states of (N x P) per head. As
 * PyTorch ops this is a loop over chunks of small ops, a stack and two scalings of every chunk's state, each a
 * pass over memory; here each head's states stream through once.
 *
 * Layout: a state is (G, N, Hg, P) (head h = g * Hg + hg, as the scan arranges it), local and starts are
 * (B, C, G, N, Hg, P), states (B, G, N, Hg, P), the scalars (B, C, H); all contiguous. Threads split the heads. */

#include <string.h>

/* Offset of row n of head (g, hg) in one state: its P values are contiguous. */
static inline long state_row(long g, long n, long hg, long N, long Hg, long P) { return ((g * N + n) * Hg + hg) * P; }

void hk_chunk_carry_forward(const float *local, const float *in, const float *decay, const float *out, const float *initial,
                            float *starts, float *final, long B, long C, long G, long N, long Hg, long P) {
    const long S = G * N * Hg * P, H = G * Hg;
#pragma omp parallel for schedule(static)
    for (long task = 0; task < B * H; task++) {
        const long b = task / H, h = task % H, g = h / Hg, hg = h % Hg;
        float *state = final + b * S;  /* the running state lives where the final one ends */
        for (long n = 0; n < N; n++) memcpy(state + state_row(g, n, hg, N, Hg, P), initial + b * S + state_row(g, n, hg, N, Hg, P), (size_t)P * sizeof(float));
        for (long k = 0; k < C; k++) {
            const long bk = b * C + k;
            const float fi = in[bk * H + h], fd = decay[bk * H + h], fo = out[bk * H + h];
            for (long n = 0; n < N; n++) {
                const long row = state_row(g, n, hg, N, Hg, P);
                float *s = state + row, *st = starts + bk * S + row;
                const float *loc = local + bk * S + row;
#pragma omp simd
                for (long p = 0; p < P; p++) {
                    st[p] = s[p] * fo;
                    s[p] = s[p] * fd + loc[p] * fi;
                }
            }
        }
    }
}

/* The backward for g_starts (B, C, S) and g_final (B, S): writes g_local (B, C, S), g_initial (B, S) and g_in,
 * g_decay, g_out (B, C, H). `states` (B, C, S) is scratch for the states S_0 .. S_{C-1}, recomputed here. */
void hk_chunk_carry_backward(const float *local, const float *in, const float *decay, const float *out,
                             const float *initial, const float *g_starts, const float *g_final, float *g_local,
                             float *g_initial, float *g_in, float *g_decay, float *g_out, float *states, long B, long C,
                             long G, long N, long Hg, long P) {
    const long S = G * N * Hg * P, H = G * Hg;
#pragma omp parallel for schedule(static)
    for (long task = 0; task < B * H; task++) {
        const long b = task / H, h = task % H, g = h / Hg, hg = h % Hg;
        for (long n = 0; n < N; n++) {  /* S_0 .. S_{C-1} again */
            const long row = state_row(g, n, hg, N, Hg, P);
            memcpy(states + b * C * S + row, initial + b * S + row, (size_t)P * sizeof(float));
            for (long k = 0; k + 1 < C; k++) {
                const long bk = b * C + k;
                const float fi = in[bk * H + h], fd = decay[bk * H + h];
                const float *s = states + bk * S + row, *loc = local + bk * S + row;
                float *next = states + (bk + 1) * S + row;
#pragma omp simd
                for (long p = 0; p < P; p++) next[p] = s[p] * fd + loc[p] * fi;
            }
        }
        float *gs = g_initial + b * S;  /* the running gradient of S_{k+1}, then of S_k */
        for (long n = 0; n < N; n++) memcpy(gs + state_row(g, n, hg, N, Hg, P), g_final + b * S + state_row(g, n, hg, N, Hg, P), (size_t)P * sizeof(float));
        for (long k = C - 1; k >= 0; k--) {
            const long bk = b * C + k;
            const float fi = in[bk * H + h], fd = decay[bk * H + h], fo = out[bk * H + h];
            double sum_in = 0.0, sum_decay = 0.0, sum_out = 0.0;
            for (long n = 0; n < N; n++) {
                const long row = state_row(g, n, hg, N, Hg, P);
                float *grad = gs + row, *gl = g_local + bk * S + row;
                const float *s = states + bk * S + row, *loc = local + bk * S + row, *gst = g_starts + bk * S + row;
                float si = 0.0f, sd = 0.0f, so = 0.0f;
#pragma omp simd reduction(+ : si, sd, so)
                for (long p = 0; p < P; p++) {
                    si += grad[p] * loc[p];
                    sd += grad[p] * s[p];
                    so += gst[p] * s[p];
                    gl[p] = grad[p] * fi;
                    grad[p] = grad[p] * fd + gst[p] * fo;
                }
                sum_in += si;
                sum_decay += sd;
                sum_out += so;
            }
            g_in[bk * H + h] = (float)sum_in;
            g_decay[bk * H + h] = (float)sum_decay;
            g_out[bk * H + h] = (float)sum_out;
        }
    }
}
