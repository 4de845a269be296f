/* The router of a few tokens without its losses, in one call (TokenRouter.route, components/router.py):
 *   gates = sigmoid((W_g u + b_g) / tau)   (R1, R2)      score = w_s . u   (R3)
 * A decoding step routes one token per block: a handful of dot products that cost less than the five PyTorch
 * ops (two products, a division, a sigmoid, a squeeze) take to launch. */

#include <math.h>

void hk_router_step(const float *u,      /* (rows, D) */
                    const float *gate_w, /* (G, D) */
                    const float *gate_b, /* (G) */
                    const float *score_w,/* (D) */
                    float *gates,        /* (rows, G) */
                    float *score,        /* (rows) */
                    long rows, long d_model, long n_gates, float temperature) {
    for (long r = 0; r < rows; r++) {
        const float *ur = u + r * d_model;
        for (long g = 0; g < n_gates; g++) {
            const float *wg = gate_w + g * d_model;
            float z = 0.0f;
#pragma omp simd reduction(+ : z)
            for (long i = 0; i < d_model; i++) z += wg[i] * ur[i];
            z = (z + gate_b[g]) / temperature;
            gates[r * n_gates + g] = 1.0f / (1.0f + expf(-z));
        }
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (long i = 0; i < d_model; i++) s += score_w[i] * ur[i];
        score[r] = s;
    }
}
