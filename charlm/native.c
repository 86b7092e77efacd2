/* The element-wise part of one time step of the custom LSTM and GRU, fused into one loop each.

   cells_fast.py runs each step's matrix products through torch; what lies
   between two products (the gate activations, the new cell and state, and in
   the backward pass the gate derivatives) is a dozen small tensor operations
   when written in PyTorch, each paying its own dispatch and its own pass over
   memory. Here each group is one pass over the B x H values. native.py
   compiles this file on first use and falls back to the PyTorch form (the
   same equations, in cells_fast.py) where it cannot; tests/test_native.py
   checks every function against that form.

   Layout: every array is float32, contiguous, row-major; B rows (the batch),
   H values per gate. The LSTM's gates are in torch's order i, f, g, o (Γu, Γf,
   c~, Γo in cells.py's notation), the GRU's r, u, c~ (torch's r, z, n). The
   exponential is written out below rather than taken from libm so that the
   compiler can vectorise the loops with plain -O3 and no fast-math flags;
   σ and tanh agree with PyTorch's to within about 1e-7. */

#include <stdint.h>
#include <string.h>

/* e^x - 1, within a few ulp of e^x - 1 also near 0, where the difference e^x - 1 would lose
   digits: x = n ln2 + r with |r| <= ln2 / 2, so e^x - 1 = 2^n (e^r - 1) + (2^n - 1), with
   e^r - 1 by its Taylor polynomial of degree 7 (Horner) and 2^n put into the exponent bits.
   x is clamped to the range where 2^n stays a normal float; a NaN stays NaN through the
   polynomial. */
static inline float expm1_f(float x)
{
    float y = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float round = 12582912.0f;                 /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (y * 1.44269504f + round) - round;     /* n = round(y / ln 2) */
    float r = (y - n * 0.693145752f) - n * 1.42860677e-6f;  /* ln 2 in two parts, the first exact */
    float q = 1.0f / 5040.0f;
    q = q * r + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r;                                       /* e^r - 1 */
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return scale * q + (scale - 1.0f);
}

/* σ(x) = 1 / (1 + e^-x) */
static inline float sigmoid_f(float x)
{
    return 1.0f / (2.0f + expm1_f(-x));
}

/* tanh(x) = (e^2x - 1) / (e^2x + 1) */
static inline float tanh_f(float x)
{
    float m = expm1_f(2.0f * x);
    return m / (m + 2.0f);
}

/* ------------------------------------------------------------------ LSTM */

/* Forward, step t. z: (B, 4H), W_ih x<t> + b on entry, the activated gates on return;
   rec: W_hh a<t-1>, (B, 4H). c_prev: c<t-1>; c, tanh_c, h: c<t>, tanh(c<t>), a<t>, each (B, H). */
void charlm_lstm_forward(float *restrict z, const float *restrict rec, const float *restrict c_prev,
                         float *restrict c, float *restrict tanh_c, float *restrict h, int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; b++) {
        float *zu = z + b * 4 * H, *zf = zu + H, *zc = zf + H, *zo = zc + H;
        const float *ru = rec + b * 4 * H, *rf = ru + H, *rc = rf + H, *ro = rc + H;
        const float *cp = c_prev + b * H;
        float *cb = c + b * H, *tb = tanh_c + b * H, *hb = h + b * H;
        for (int64_t k = 0; k < H; k++) {
            float u = sigmoid_f(zu[k] + ru[k]);  /* Γu = σ(W_u [a<t-1>, x<t>] + b_u) */
            float f = sigmoid_f(zf[k] + rf[k]);  /* Γf = σ(W_f [a<t-1>, x<t>] + b_f) */
            float ct = tanh_f(zc[k] + rc[k]);    /* c~<t> = tanh(W_c [a<t-1>, x<t>] + b_c) */
            float o = sigmoid_f(zo[k] + ro[k]);  /* Γo = σ(W_o [a<t-1>, x<t>] + b_o) */
            float cn = u * ct + f * cp[k];       /* c<t> = Γu * c~<t> + Γf * c<t-1> */
            float tc = tanh_f(cn);
            zu[k] = u; zf[k] = f; zc[k] = ct; zo[k] = o;
            cb[k] = cn; tb[k] = tc;
            hb[k] = o * tc;                      /* a<t> = Γo * tanh(c<t>) */
        }
    }
}

/* Backward, step t. da = grad_h + rec is dL/da<t>: grad_h from the output (rows `grad_stride`
   apart), rec = W_hh^T d_pre<t+1> from step t+1 (NULL at the last step). dc: on entry dL/dc<t>
   from step t+1, on return dL/dc<t-1>. gates: the activated gates of step t (B, 4H); c_prev,
   tanh_c: c<t-1>, tanh(c<t>). d_pre: (B, 4H), dL/d(gate pre-activations). */
void charlm_lstm_backward(const float *restrict grad_h, int64_t grad_stride, const float *restrict rec,
                          float *restrict dc, const float *restrict gates, const float *restrict c_prev,
                          const float *restrict tanh_c, float *restrict d_pre, int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; b++) {
        const float *gu = gates + b * 4 * H, *gf = gu + H, *gc = gf + H, *go = gc + H;
        const float *gh = grad_h + b * grad_stride, *rb = rec ? rec + b * H : NULL;
        const float *cp = c_prev + b * H, *tb = tanh_c + b * H;
        float *dcb = dc + b * H;
        float *du = d_pre + b * 4 * H, *df = du + H, *dct = df + H, *dout = dct + H;
        for (int64_t k = 0; k < H; k++) {
            float u = gu[k], f = gf[k], ct = gc[k], o = go[k], tc = tb[k];
            float a = rb ? gh[k] + rb[k] : gh[k];          /* da<t> */
            float d = dcb[k] + a * o * (1.0f - tc * tc);   /* dc<t> = dc from t+1 + da Γo (1 - tanh²(c<t>)) */
            dout[k] = a * tc * o * (1.0f - o);             /* dΓo-pre = da tanh(c<t>) Γo (1 - Γo) */
            du[k] = d * ct * u * (1.0f - u);               /* dΓu-pre = dc c~<t> Γu (1 - Γu) */
            df[k] = d * cp[k] * f * (1.0f - f);            /* dΓf-pre = dc c<t-1> Γf (1 - Γf) */
            dct[k] = d * u * (1.0f - ct * ct);             /* dc~-pre = dc Γu (1 - c~²) */
            dcb[k] = d * f;                                /* what c<t-1> receives */
        }
    }
}

/* ------------------------------------------------------------------ GRU (classic form) */

/* Forward, step t, between the two products. ru: the first 2H columns of the step's (B, 3H)
   gate rows (`stride` apart), W_ih x<t> + b on entry, Γr, Γu on return; rec: W_hh,ru h<t-1>,
   (B, 2H). h_prev: h<t-1>; rh: Γr * h<t-1>, (B, H). */
void charlm_gru_gates(float *restrict ru, int64_t stride, const float *restrict rec,
                      const float *restrict h_prev, float *restrict rh, int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; b++) {
        float *gb = ru + b * stride;
        const float *rb = rec + b * 2 * H, *hp = h_prev + b * H;
        float *out = rh + b * H;
        for (int64_t k = 0; k < 2 * H; k++)
            gb[k] = sigmoid_f(gb[k] + rb[k]);    /* Γr, Γu = σ(W [h<t-1>, x<t>] + b) */
        for (int64_t k = 0; k < H; k++)
            out[k] = gb[k] * hp[k];              /* Γr * h<t-1> */
    }
}

/* Forward, step t, after the second product. gates: the step's (B, 3H) rows (`stride` apart),
   Γr, Γu activated and W_ih,c x<t> + b_c in the last H columns, which become c~<t>; rec:
   W_hh,c (Γr * h<t-1>), (B, H). h: h<t>, (B, H). */
void charlm_gru_state(float *restrict gates, int64_t stride, const float *restrict rec,
                      const float *restrict h_prev, float *restrict h, int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; b++) {
        float *gu = gates + b * stride + H, *gc = gu + H;
        const float *rb = rec + b * H, *hp = h_prev + b * H;
        float *hb = h + b * H;
        for (int64_t k = 0; k < H; k++) {
            float ct = tanh_f(gc[k] + rb[k]);    /* c~<t> = tanh(W_c [Γr * h<t-1>, x<t>] + b_c) */
            gc[k] = ct;
            hb[k] = hp[k] + gu[k] * (ct - hp[k]);  /* h<t> = h<t-1> + Γu (c~<t> - h<t-1>) */
        }
    }
}

/* Backward, step t, first half. dh = grad_h + carry + rec is dL/dh<t>: grad_h from the output
   (rows `grad_stride` apart), carry = (1 - Γu) dh<t+1> + Γr d(Γr h) from step t+1 and rec =
   W_ru^T [dΓr-pre, dΓu-pre]<t+1> (both NULL at the last step); it is written to dh. gates:
   the step's activated Γr, Γu, c~ (B, 3H); h_prev: h<t-1>. d_ru: the step's (B, 2H) rows for
   dΓr-pre, dΓu-pre, of which the dΓu-pre half is written here; d_c: dc~-pre, (B, H). */
void charlm_gru_backward_state(const float *restrict grad_h, int64_t grad_stride, const float *restrict carry,
                               const float *restrict rec, const float *restrict gates,
                               const float *restrict h_prev, float *restrict dh, float *restrict d_ru,
                               float *restrict d_c, int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; b++) {
        const float *gh = grad_h + b * grad_stride, *gu = gates + b * 3 * H + H, *gc = gu + H;
        const float *cb = carry ? carry + b * H : NULL, *rb = rec ? rec + b * H : NULL;
        const float *hp = h_prev + b * H;
        float *dhb = dh + b * H, *du = d_ru + b * 2 * H + H, *dcb = d_c + b * H;
        for (int64_t k = 0; k < H; k++) {
            float u = gu[k], ct = gc[k];
            float d = cb ? gh[k] + cb[k] + rb[k] : gh[k];  /* dh<t> */
            dhb[k] = d;
            dcb[k] = d * u * (1.0f - ct * ct);             /* dc~-pre = dh Γu (1 - c~²) */
            du[k] = d * (ct - hp[k]) * u * (1.0f - u);     /* dΓu-pre = dh (c~ - h<t-1>) Γu (1 - Γu) */
        }
    }
}

/* Backward, step t, second half. d_rh = W_c^T dc~-pre = d(Γr * h<t-1>); dh: dL/dh<t> from the
   first half. Writes dΓr-pre into the first half of d_ru's rows and the part of dL/dh<t-1>
   that bypasses the products into carry: (1 - Γu) dh<t> + Γr d(Γr h). */
void charlm_gru_backward_reset(const float *restrict d_rh, const float *restrict dh, const float *restrict gates,
                               const float *restrict h_prev, float *restrict d_ru, float *restrict carry,
                               int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; b++) {
        const float *gr = gates + b * 3 * H, *gu = gr + H;
        const float *db = d_rh + b * H, *dhb = dh + b * H, *hp = h_prev + b * H;
        float *dr = d_ru + b * 2 * H, *cb = carry + b * H;
        for (int64_t k = 0; k < H; k++) {
            float r = gr[k];
            dr[k] = db[k] * hp[k] * r * (1.0f - r);      /* dΓr-pre = d(Γr h) h<t-1> Γr (1 - Γr) */
            cb[k] = (1.0f - gu[k]) * dhb[k] + r * db[k];
        }
    }
}
