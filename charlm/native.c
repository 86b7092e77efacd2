/* The element-wise part of one time step of the custom LSTM and GRU, fused into one loop each.

   cells_fast.py runs each step's matrix products through torch; what lies
   between two products (the gate activations, the new cell and state, and in
   the backward pass the gate derivatives) is a dozen small tensor operations
   when written in PyTorch, each paying its own dispatch and its own pass over
   memory. Here each group is one pass over the B x H values. native.py
   compiles this file on first use and falls back to the PyTorch form (the
   same equations, in cells_fast.py) where it cannot; tests/test_native.py
   checks every function against that form.

   Layout: every array is float32, row-major, B rows (the batch) of H values per
   gate, each row contiguous; the rows lie back to back except where a stride is
   passed. native.py's wrappers take B and H from the buffers the kernel writes,
   and cells_fast.py calls them only with buffers of those shapes. The LSTM's gates are in torch's order i, f, g, o (Γu, Γf,
   c~, Γo in cells.py's notation), the GRU's r, u, c~ (torch's r, z, n). The
   exponential is written out below rather than taken from libm so that the
   compiler can vectorise the loops with -O3 and no fast-math flags; σ and tanh
   agree with PyTorch's to within about 1e-7. native.py adds -fno-trapping-math,
   which changes no result: without it GCC 12 vectorises the exponential's
   clamps (a ternary on floats) only for AVX-512 with Intel tuning, and the
   loops ran 6x slower on AVX2 (docs/benchmarks.md). */

#include <stdint.h>
#include <string.h>

/* Built with -fopenmp, the rows of a batch are split among the threads when there are enough
   values to repay it. native.py keeps such a build only where it loads no OpenMP runtime of its
   own, i.e. where it shares PyTorch's (libgomp on Linux), its threads and its thread count
   (torch.set_num_threads); charlm_openmp_threads says how many a loop would use (0: no OpenMP). */
#ifdef _OPENMP
#include <omp.h>
/* not inside a region of their own: a loop split by rows (charlm_gru_forward_loop) runs the kernels of
   each block in its thread, whatever OMP_NESTED or OMP_MAX_ACTIVE_LEVELS say */
#define PARALLEL_ROWS _Pragma("omp parallel for if (B * H >= 4096 && !omp_in_parallel()) schedule(static)")
int charlm_openmp_threads(void) { return omp_get_max_threads(); }
/* A time loop split by batch rows (parts > 1): `parts` threads, each running the statement with lo and
   n naming its block of the B rows, the whole window through, its products and kernels in its own
   thread. Otherwise the statement runs once for all the rows. The macro itself declares lo and n (and
   the names ending in _), for the statement to use. */
#define BY_ROWS(parts, B, ...) do {                                                           \
        const int parts_ = (parts);                                                           \
        const int64_t B_ = (B);                                                               \
        if (parts_ > 1) {                                                                     \
            _Pragma("omp parallel num_threads(parts_)")                                       \
            {                                                                                 \
                const int64_t k_ = omp_get_thread_num(), m_ = omp_get_num_threads();          \
                const int64_t lo = B_ * k_ / m_, n = B_ * (k_ + 1) / m_ - lo;                 \
                __VA_ARGS__;                                                                  \
            }                                                                                 \
        } else {                                                                              \
            const int64_t lo = 0, n = B_;                                                     \
            __VA_ARGS__;                                                                      \
        }                                                                                     \
    } while (0)
#else
#define PARALLEL_ROWS
int charlm_openmp_threads(void) { return 0; }
#define BY_ROWS(parts, B, ...) do { (void)(parts); const int64_t B_ = (B), lo = 0, n = B_; __VA_ARGS__; } while (0)
#endif

/* e^x - 1, within a few ulp of e^x - 1 also near 0, where the difference e^x - 1 would lose
   digits: x = n ln2 + r with |r| <= ln2 / 2, so e^x - 1 = 2^n (e^r - 1) + (2^n - 1), with
   e^r - 1 by its Taylor polynomial of degree 7 (Horner) and 2^n put into the exponent bits.
   x is clamped to the range where 2^n stays a normal float; a NaN stays NaN through the
   polynomial (and n is not converted to an integer then, which C leaves undefined). */
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
    int32_t bits = ((int32_t)(n == n ? n : 0.0f) + 127) << 23;
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

/* Each kernel below is a function of one batch row, with restrict pointers so that the compiler
   vectorises its loop, and an exported function that runs it for every row. */

/* ------------------------------------------------------------------ LSTM */

static void lstm_forward_row(float *restrict zu, float *restrict zf, float *restrict zc, float *restrict zo,
                             const float *restrict ru, const float *restrict rf, const float *restrict rc,
                             const float *restrict ro, const float *restrict cp, float *restrict cb,
                             float *restrict tb, float *restrict hb, int64_t H)
{
    for (int64_t k = 0; k < H; k++) {
        float u = sigmoid_f(zu[k] + ru[k]);      /* Γu = σ(W_u [a<t-1>, x<t>] + b_u) */
        float f = sigmoid_f(zf[k] + rf[k]);      /* Γf = σ(W_f [a<t-1>, x<t>] + b_f) */
        float ct = tanh_f(zc[k] + rc[k]);        /* c~<t> = tanh(W_c [a<t-1>, x<t>] + b_c) */
        float o = sigmoid_f(zo[k] + ro[k]);      /* Γo = σ(W_o [a<t-1>, x<t>] + b_o) */
        float cn = u * ct + f * cp[k];           /* c<t> = Γu * c~<t> + Γf * c<t-1> */
        float tc = tanh_f(cn);
        zu[k] = u; zf[k] = f; zc[k] = ct; zo[k] = o;
        cb[k] = cn; tb[k] = tc;
        hb[k] = o * tc;                          /* a<t> = Γo * tanh(c<t>) */
    }
}

/* Forward, step t. z: (B, 4H), W_ih x<t> + b on entry, the activated gates on return;
   rec: W_hh a<t-1>, (B, 4H). c_prev: c<t-1>; c, tanh_c, h: c<t>, tanh(c<t>), a<t>, each (B, H). */
void charlm_lstm_forward(float *z, const float *rec, const float *c_prev, float *c, float *tanh_c, float *h,
                         int64_t B, int64_t H)
{
    PARALLEL_ROWS
    for (int64_t b = 0; b < B; b++) {
        float *zr = z + b * 4 * H;
        const float *rr = rec + b * 4 * H;
        lstm_forward_row(zr, zr + H, zr + 2 * H, zr + 3 * H, rr, rr + H, rr + 2 * H, rr + 3 * H,
                         c_prev + b * H, c + b * H, tanh_c + b * H, h + b * H, H);
    }
}

static void lstm_backward_row(const float *restrict gh, const float *restrict rb, float *restrict dcb,
                              const float *restrict gu, const float *restrict gf, const float *restrict gc,
                              const float *restrict go, const float *restrict cp, const float *restrict tb,
                              float *restrict du, float *restrict df, float *restrict dct, float *restrict dout,
                              int64_t H)
{
    for (int64_t k = 0; k < H; k++) {
        float u = gu[k], f = gf[k], ct = gc[k], o = go[k], tc = tb[k];
        float a = gh[k] + rb[k];                       /* da<t> */
        float d = dcb[k] + a * o * (1.0f - tc * tc);   /* dc<t> = dc from t+1 + da Γo (1 - tanh²(c<t>)) */
        dout[k] = a * tc * o * (1.0f - o);             /* dΓo-pre = da tanh(c<t>) Γo (1 - Γo) */
        du[k] = d * ct * u * (1.0f - u);               /* dΓu-pre = dc c~<t> Γu (1 - Γu) */
        df[k] = d * cp[k] * f * (1.0f - f);            /* dΓf-pre = dc c<t-1> Γf (1 - Γf) */
        dct[k] = d * u * (1.0f - ct * ct);             /* dc~-pre = dc Γu (1 - c~²) */
        dcb[k] = d * f;                                /* what c<t-1> receives */
    }
}

/* Backward, step t. da = grad_h + rec is dL/da<t>: grad_h from the output (rows `grad_stride`
   apart), rec = W_hh^T d_pre<t+1> from step t+1 (zeros at the last step). dc: on entry dL/dc<t>
   from step t+1, on return dL/dc<t-1>. gates: the activated gates of step t (B, 4H); c_prev,
   tanh_c: c<t-1>, tanh(c<t>). d_pre: (B, 4H), dL/d(gate pre-activations). */
void charlm_lstm_backward(const float *grad_h, int64_t grad_stride, const float *rec, float *dc,
                          const float *gates, const float *c_prev, const float *tanh_c, float *d_pre,
                          int64_t B, int64_t H)
{
    PARALLEL_ROWS
    for (int64_t b = 0; b < B; b++) {
        const float *g = gates + b * 4 * H;
        float *d = d_pre + b * 4 * H;
        lstm_backward_row(grad_h + b * grad_stride, rec + b * H, dc + b * H, g, g + H, g + 2 * H, g + 3 * H,
                          c_prev + b * H, tanh_c + b * H, d, d + H, d + 2 * H, d + 3 * H, H);
    }
}

/* ------------------------------------------------------------------ GRU (classic form) */

static void gru_gates_row(float *restrict gb, const float *restrict rb, const float *restrict hp,
                          float *restrict out, int64_t H)
{
    for (int64_t k = 0; k < 2 * H; k++)
        gb[k] = sigmoid_f(gb[k] + rb[k]);        /* Γr, Γu = σ(W [h<t-1>, x<t>] + b) */
    for (int64_t k = 0; k < H; k++)
        out[k] = gb[k] * hp[k];                  /* Γr * h<t-1> */
}

/* Forward, step t, between the two products. ru: the first 2H columns of the step's (B, 3H)
   gate rows (`stride` apart), W_ih x<t> + b on entry, Γr, Γu on return; rec: W_hh,ru h<t-1>,
   (B, 2H). h_prev: h<t-1>; rh: Γr * h<t-1>, (B, H). */
void charlm_gru_gates(float *ru, int64_t stride, const float *rec, const float *h_prev, float *rh,
                      int64_t B, int64_t H)
{
    PARALLEL_ROWS
    for (int64_t b = 0; b < B; b++)
        gru_gates_row(ru + b * stride, rec + b * 2 * H, h_prev + b * H, rh + b * H, H);
}

static void gru_state_row(const float *restrict gu, float *restrict gc, const float *restrict rb,
                          const float *restrict hp, float *restrict hb, int64_t H)
{
    for (int64_t k = 0; k < H; k++) {
        float ct = tanh_f(gc[k] + rb[k]);        /* c~<t> = tanh(W_c [Γr * h<t-1>, x<t>] + b_c) */
        gc[k] = ct;
        hb[k] = hp[k] + gu[k] * (ct - hp[k]);    /* h<t> = h<t-1> + Γu (c~<t> - h<t-1>) */
    }
}

/* Forward, step t, after the second product. gates: the step's (B, 3H) rows (`stride` apart),
   Γr, Γu activated and W_ih,c x<t> + b_c in the last H columns, which become c~<t>; rec:
   W_hh,c (Γr * h<t-1>), (B, H). h: h<t>, (B, H). */
void charlm_gru_state(float *gates, int64_t stride, const float *rec, const float *h_prev, float *h,
                      int64_t B, int64_t H)
{
    PARALLEL_ROWS
    for (int64_t b = 0; b < B; b++) {
        float *g = gates + b * stride;
        gru_state_row(g + H, g + 2 * H, rec + b * H, h_prev + b * H, h + b * H, H);
    }
}

static void gru_backward_state_row(const float *restrict gh, const float *restrict cb, const float *restrict rb,
                                   const float *restrict gu, const float *restrict gc, const float *restrict hp,
                                   float *restrict dhb, float *restrict du, float *restrict dcb, int64_t H)
{
    for (int64_t k = 0; k < H; k++) {
        float u = gu[k], ct = gc[k];
        float d = gh[k] + cb[k] + rb[k];               /* dh<t> */
        dhb[k] = d;
        dcb[k] = d * u * (1.0f - ct * ct);             /* dc~-pre = dh Γu (1 - c~²) */
        du[k] = d * (ct - hp[k]) * u * (1.0f - u);     /* dΓu-pre = dh (c~ - h<t-1>) Γu (1 - Γu) */
    }
}

/* Backward, step t, first half. dh = grad_h + carry + rec is dL/dh<t>: grad_h from the output
   (rows `grad_stride` apart), carry = (1 - Γu) dh<t+1> + Γr d(Γr h) from step t+1 and rec =
   W_ru^T [dΓr-pre, dΓu-pre]<t+1> (both zeros at the last step); it is written to dh. gates:
   the step's activated Γr, Γu, c~ (B, 3H); h_prev: h<t-1>. d_ru: the step's (B, 2H) rows for
   dΓr-pre, dΓu-pre, of which the dΓu-pre half is written here; d_c: dc~-pre, (B, H). */
void charlm_gru_backward_state(const float *grad_h, int64_t grad_stride, const float *carry, const float *rec,
                               const float *gates, const float *h_prev, float *dh, float *d_ru, float *d_c,
                               int64_t B, int64_t H)
{
    PARALLEL_ROWS
    for (int64_t b = 0; b < B; b++) {
        const float *g = gates + b * 3 * H;
        gru_backward_state_row(grad_h + b * grad_stride, carry + b * H, rec + b * H, g + H, g + 2 * H,
                               h_prev + b * H, dh + b * H, d_ru + b * 2 * H + H, d_c + b * H, H);
    }
}

static void gru_backward_reset_row(const float *restrict db, const float *restrict dhb, const float *restrict gr,
                                   const float *restrict gu, const float *restrict hp, float *restrict dr,
                                   float *restrict cb, int64_t H)
{
    for (int64_t k = 0; k < H; k++) {
        float r = gr[k];
        dr[k] = db[k] * hp[k] * r * (1.0f - r);  /* dΓr-pre = d(Γr h) h<t-1> Γr (1 - Γr) */
        cb[k] = (1.0f - gu[k]) * dhb[k] + r * db[k];
    }
}

/* Backward, step t, second half. d_rh = W_c^T dc~-pre = d(Γr * h<t-1>); dh: dL/dh<t> from the
   first half. Writes dΓr-pre into the first half of d_ru's rows and the part of dL/dh<t-1>
   that bypasses the products into carry: (1 - Γu) dh<t> + Γr d(Γr h). */
void charlm_gru_backward_reset(const float *d_rh, const float *dh, const float *gates, const float *h_prev,
                               float *d_ru, float *carry, int64_t B, int64_t H)
{
    PARALLEL_ROWS
    for (int64_t b = 0; b < B; b++) {
        const float *g = gates + b * 3 * H;
        gru_backward_reset_row(d_rh + b * H, dh + b * H, g, g + H, h_prev + b * H, d_ru + b * 2 * H,
                               carry + b * H, H);
    }
}

/* ------------------------------------------------------------------ whole time loops

   The loops above are called once a time step from Python, between two matrix products that
   torch runs; each product then pays torch's dispatch and oneDNN's set-up (10-15 us at these
   sizes) and each step pays Python's loop. The functions below run a layer's whole time loop
   here instead (a classic GRU's, a plain RNN's, an LSTM's), with the recurrent products done
   by a packed-matrix product that native.py passes in as `gemm`: MKL's cblas_sgemm_compute, found
   in PyTorch's own library, which multiplies by a weight matrix laid out once by
   cblas_sgemm_pack, or charlm_sgemm_compute at the end of this file, which has the same
   interface. Each step then calls the same row kernels as above. */

/* C (m, n) = A (m, k) W + beta C, with W packed beforehand; row-major, leading dimensions lda, ldc.
   The arguments are MKL's (LP64: int); 101 = CblasRowMajor, 111 = CblasNoTrans, 151 = CblasPacked. */
typedef void (*charlm_gemm)(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                            const float *b, int ldb, float beta, float *c, int ldc);

static void product(charlm_gemm gemm, const float *packed, const float *a, int64_t lda, float *c, int64_t ldc,
                    int64_t m, int64_t n, int64_t k)
{
    gemm(101, 111, 151, (int)m, (int)n, (int)k, a, (int)lda, packed, (int)n, 0.0f, c, (int)ldc);
}

/* ------------------------------------------------------------------ LSTM

   With MKL's product the LSTM's loop did not pay unsplit (its one product a step, 32 x 256 by 256 x 1024,
   was as fast through oneDNN and ran slower inside the loop on two threads); native.py runs it with
   charlm's own product, and with MKL's only split by batch rows and where W_hh holds 1 MiB or less
   (native.lstm_loops, docs/benchmarks.md). */

/* The LSTM forward over T steps, for the n batch rows from row lo of a batch of B; rec: (n, 4H) scratch. */
static void lstm_forward_rows(charlm_gemm gemm, const float *w, float *gates, const float *h0, const float *c0,
                              float *hs, float *cs, float *tanh_cs, float *rec, int64_t T, int64_t B, int64_t lo,
                              int64_t n, int64_t H, int save)
{
    const int64_t step = B * H;
    const float *h = h0 + lo * H, *c = c0 + lo * H;
    for (int64_t t = 0; t < T; t++) {
        float *c_new = cs + (save ? t + 1 : t % 2) * step + lo * H, *h_t = hs + t * step + lo * H;
        product(gemm, w, h, H, rec, 4 * H, n, 4 * H, H);             /* W_hh a<t-1> */
        charlm_lstm_forward(gates + t * 4 * step + lo * 4 * H, rec, c, c_new, tanh_cs + (save ? t : 0) * step + lo * H,
                            h_t, n, H);
        h = h_t;
        c = c_new;
    }
}

/* The LSTM forward over T steps. gates: (T, B, 4H), W_ih x<t> + b on entry, the activated gates on
   return; w: W_hh^T packed (H -> 4H); h0, c0: (B, H); hs: (T, B, H). With `save`, cs is (T + 1, B, H)
   with c0 already in cs[0], and tanh_cs (T, B, H); without, cs holds two steps and tanh_cs one.
   rec: (B, 4H) scratch. On return c<T> is in cs[T] (save) or cs[(T - 1) % 2]. parts: as for
   charlm_gru_forward_loop. */
void charlm_lstm_forward_loop(charlm_gemm gemm, const float *w, float *gates, const float *h0, const float *c0,
                              float *hs, float *cs, float *tanh_cs, float *rec, int64_t T, int64_t B,
                              int64_t H, int save, int parts)
{
    BY_ROWS(parts, B, lstm_forward_rows(gemm, w, gates, h0, c0, hs, cs, tanh_cs, rec + lo * 4 * H, T, B, lo, n, H,
                                        save));
}

/* The LSTM backward over T steps, for the n batch rows from row lo of a batch of B; rec: the (B, H) scratch
   of the whole batch, of which the block uses its own rows. */
static void lstm_backward_rows(charlm_gemm gemm, const float *w, const float *grad_hs, int64_t t_stride,
                               int64_t b_stride, float *dc, const float *gates, const float *cs,
                               const float *tanh_cs, float *d_pre, float *rec, int64_t T, int64_t B, int64_t lo,
                               int64_t n, int64_t H)
{
    const int64_t step = B * H;
    grad_hs += lo * b_stride, dc += lo * H, gates += lo * 4 * H, cs += lo * H, tanh_cs += lo * H;
    d_pre += lo * 4 * H, rec += lo * H;
    memset(rec, 0, (size_t)(n * H) * sizeof(float));                /* nothing from step T */
    for (int64_t t = T - 1; t >= 0; t--) {
        if (t < T - 1)
            product(gemm, w, d_pre + (t + 1) * 4 * step, 4 * H, rec, H, n, H, 4 * H);   /* W_hh^T d_pre<t+1> */
        charlm_lstm_backward(grad_hs + t * t_stride, b_stride, rec, dc, gates + t * 4 * step, cs + t * step,
                             tanh_cs + t * step, d_pre + t * 4 * step, n, H);
    }
}

/* The LSTM backward over T steps, the loop of charlm_lstm_backward. grad_hs: dL/da<t> from the
   output, step t's row b at grad_hs + t * t_stride + b * b_stride; w: W_hh packed (4H -> H);
   dc: dL/dc<T> on entry, dL/dc<0> on return; gates, cs, tanh_cs: what the forward saved (cs[t] is
   c<t-1> of step t); d_pre: (T, B, 4H) out; rec: (B, H) scratch. parts: as for charlm_gru_forward_loop. */
void charlm_lstm_backward_loop(charlm_gemm gemm, const float *w, const float *grad_hs, int64_t t_stride,
                               int64_t b_stride, float *dc, const float *gates, const float *cs,
                               const float *tanh_cs, float *d_pre, float *rec, int64_t T, int64_t B, int64_t H,
                               int parts)
{
    BY_ROWS(parts, B, lstm_backward_rows(gemm, w, grad_hs, t_stride, b_stride, dc, gates, cs, tanh_cs, d_pre, rec,
                                         T, B, lo, n, H));
}

/* ------------------------------------------------------------------ plain RNN */

static void rnn_tanh_row(float *restrict a, int64_t H)
{
    for (int64_t k = 0; k < H; k++)
        a[k] = tanh_f(a[k]);                     /* a<t> = tanh(W_ax x<t> + W_aa a<t-1> + b) */
}

static void rnn_relu_row(float *restrict a, int64_t H)
{
    for (int64_t k = 0; k < H; k++)
        a[k] = a[k] < 0.0f ? 0.0f : a[k];        /* max(0, ...); a NaN stays NaN, as torch's relu */
}

/* The plain RNN forward over T steps, for the n batch rows from row lo of a batch of B. */
static void rnn_forward_rows(charlm_gemm gemm, const float *w, float *hs, const float *h0, int64_t T,
                             int64_t B, int64_t lo, int64_t n, int64_t H, int relu)
{
    const int64_t step = B * H;
    const float *h = h0 + lo * H;
    for (int64_t t = 0; t < T; t++) {
        float *a = hs + t * step + lo * H;
        gemm(101, 111, 151, (int)n, (int)H, (int)H, h, (int)H, w, (int)H, 1.0f, a, (int)H);   /* += W_aa a<t-1> */
        PARALLEL_ROWS
        for (int64_t b = 0; b < n; b++) {
            if (relu)
                rnn_relu_row(a + b * H, H);
            else
                rnn_tanh_row(a + b * H, H);
        }
        h = a;
    }
}

/* The plain RNN forward over T steps. hs: (T, B, H), W_ax x<t> + b on entry, a<t> on return; w:
   W_aa^T packed (H -> H); h0: (B, H). Each step adds W_aa a<t-1> into its rows and activates them.
   parts: as for charlm_gru_forward_loop. */
void charlm_rnn_forward_loop(charlm_gemm gemm, const float *w, float *hs, const float *h0, int64_t T,
                             int64_t B, int64_t H, int relu, int parts)
{
    BY_ROWS(parts, B, rnn_forward_rows(gemm, w, hs, h0, T, B, lo, n, H, relu));
}

static void rnn_backward_row(const float *restrict gh, const float *restrict rb, const float *restrict hb,
                             float *restrict db, int64_t H, int relu)
{
    if (relu) {
        for (int64_t k = 0; k < H; k++)
            db[k] = hb[k] > 0.0f ? gh[k] + rb[k] : 0.0f;   /* relu'(pre) = 1 where a<t> > 0 */
    } else {
        for (int64_t k = 0; k < H; k++)
            db[k] = (gh[k] + rb[k]) * (1.0f - hb[k] * hb[k]);   /* tanh' = 1 - a<t>^2 */
    }
}

/* The plain RNN backward over T steps, for the n batch rows from row lo of a batch of B; rec as for the
   LSTM's. */
static void rnn_backward_rows(charlm_gemm gemm, const float *w, const float *grad_hs, int64_t t_stride,
                              int64_t b_stride, const float *hs, float *d_pre, float *rec, int64_t T, int64_t B,
                              int64_t lo, int64_t n, int64_t H, int relu)
{
    const int64_t step = B * H;
    grad_hs += lo * b_stride, hs += lo * H, d_pre += lo * H, rec += lo * H;
    memset(rec, 0, (size_t)(n * H) * sizeof(float));                /* nothing from step T */
    for (int64_t t = T - 1; t >= 0; t--) {
        if (t < T - 1)
            product(gemm, w, d_pre + (t + 1) * step, H, rec, H, n, H, H);   /* W_aa^T d_pre<t+1> */
        const float *g = grad_hs + t * t_stride, *h = hs + t * step;
        float *d = d_pre + t * step;
        PARALLEL_ROWS
        for (int64_t b = 0; b < n; b++)
            rnn_backward_row(g + b * b_stride, rec + b * H, h + b * H, d + b * H, H, relu);
    }
}

/* The plain RNN backward over T steps: dL/d(pre-activation) of every step into d_pre (T, B, H), with
   da<t> = grad_hs<t> (rows as for the LSTM) + W_aa^T d_pre<t+1>; w: W_aa packed (H -> H); hs: the
   forward's a<t>; rec: (B, H) scratch. parts: as for charlm_gru_forward_loop. */
void charlm_rnn_backward_loop(charlm_gemm gemm, const float *w, const float *grad_hs, int64_t t_stride,
                              int64_t b_stride, const float *hs, float *d_pre, float *rec, int64_t T, int64_t B,
                              int64_t H, int relu, int parts)
{
    BY_ROWS(parts, B, rnn_backward_rows(gemm, w, grad_hs, t_stride, b_stride, hs, d_pre, rec, T, B, lo, n, H,
                                        relu));
}

/* The classic GRU forward over T steps, for the n batch rows from row lo of a batch of B (the
   other rows of the buffers untouched); rec: (n, 2H) scratch. */
static void gru_forward_rows(charlm_gemm gemm, const float *w_ru, const float *w_c, float *gates,
                             const float *h0, float *hs, float *rh, float *rec, int64_t T, int64_t B,
                             int64_t lo, int64_t n, int64_t H, int save)
{
    const int64_t step = B * H;
    const float *h = h0 + lo * H;
    for (int64_t t = 0; t < T; t++) {
        float *g = gates + t * 3 * step + lo * 3 * H, *r_h = rh + (save ? t : 0) * step + lo * H;
        float *h_t = hs + t * step + lo * H;
        product(gemm, w_ru, h, H, rec, 2 * H, n, 2 * H, H);          /* W_hh,ru h<t-1> */
        charlm_gru_gates(g, 3 * H, rec, h, r_h, n, H);
        product(gemm, w_c, r_h, H, rec, H, n, H, H);                 /* W_hh,c (Γr * h<t-1>) */
        charlm_gru_state(g, 3 * H, rec, h, h_t, n, H);
        h = h_t;
    }
}

/* The classic GRU forward over T steps. gates: (T, B, 3H), W_ih x<t> + b on entry, Γr, Γu, c~ on
   return; w_ru: W_hh,ru^T packed (H -> 2H), w_c: W_hh,c^T packed (H -> H); hs: (T, B, H); rh:
   Γr * h<t-1>, (T, B, H) with `save`, else one step; rec: (B, 2H) scratch.
   parts > 1 (an OpenMP build): the batch's rows are split into that many blocks, each thread
   running the whole loop over its block with products of one thread (inside a parallel region
   the kernels' own row loops and MKL keep to the calling thread), instead of every product and
   kernel being split among the threads at every step. */
void charlm_gru_forward_loop(charlm_gemm gemm, const float *w_ru, const float *w_c, float *gates,
                             const float *h0, float *hs, float *rh, float *rec, int64_t T, int64_t B, int64_t H,
                             int save, int parts)
{
    BY_ROWS(parts, B, gru_forward_rows(gemm, w_ru, w_c, gates, h0, hs, rh, rec + lo * 2 * H, T, B, lo, n, H,
                                       save));
}

/* The classic GRU backward over T steps, the loop of charlm_gru_backward_state and _reset.
   grad_hs as for the LSTM; w_ru: W_hh,ru packed (2H -> H), w_c: W_hh,c packed (H -> H); gates,
   h_prev: (T, B, 3H) activated gates and (T, B, H) h<t-1>; d_ru (T, B, 2H), d_c (T, B, H) out.
   carry, rec: (B, H), zeros on entry; on return the two parts of dL/dh<0> that the caller adds
   (rec only if `need_h0`). dh, d_rh: (B, H) scratch. */
static void gru_backward_rows(charlm_gemm gemm, const float *w_ru, const float *w_c, const float *grad_hs,
                              int64_t t_stride, int64_t b_stride, const float *gates, const float *h_prev,
                              float *d_ru, float *d_c, float *carry, float *rec, float *dh, float *d_rh,
                              int64_t T, int64_t B, int64_t lo, int64_t n, int64_t H, int need_h0)
{
    const int64_t step = B * H;
    grad_hs += lo * b_stride, gates += lo * 3 * H, h_prev += lo * H, d_ru += lo * 2 * H, d_c += lo * H;
    carry += lo * H, rec += lo * H, dh += lo * H, d_rh += lo * H;
    for (int64_t t = T - 1; t >= 0; t--) {
        const float *g = gates + t * 3 * step, *hp = h_prev + t * step;
        float *dru = d_ru + t * 2 * step, *dct = d_c + t * step;
        charlm_gru_backward_state(grad_hs + t * t_stride, b_stride, carry, rec, g, hp, dh, dru, dct, n, H);
        product(gemm, w_c, dct, H, d_rh, H, n, H, H);               /* d(Γr h<t-1>) = W_c^T dc~-pre */
        charlm_gru_backward_reset(d_rh, dh, g, hp, dru, carry, n, H);
        if (t > 0 || need_h0)
            product(gemm, w_ru, dru, 2 * H, rec, H, n, H, 2 * H);   /* W_ru^T [dΓr-pre, dΓu-pre] */
    }
}

/* parts: as for charlm_gru_forward_loop, each thread going back through the steps of its rows. */
void charlm_gru_backward_loop(charlm_gemm gemm, const float *w_ru, const float *w_c, const float *grad_hs,
                              int64_t t_stride, int64_t b_stride, const float *gates, const float *h_prev,
                              float *d_ru, float *d_c, float *carry, float *rec, float *dh, float *d_rh,
                              int64_t T, int64_t B, int64_t H, int need_h0, int parts)
{
    BY_ROWS(parts, B, gru_backward_rows(gemm, w_ru, w_c, grad_hs, t_stride, b_stride, gates, h_prev, d_ru, d_c,
                                        carry, rec, dh, d_rh, T, B, lo, n, H, need_h0));
}

/* ------------------------------------------------------------------ charlm's own packed product

   MKL's packed product is the loops' best partner where it runs its best kernels. On an AMD
   processor with AVX-512 it does not (it keeps to AVX2 there), and a torch built without MKL
   has none at all. For those, here is a small product with the same interface (the three
   functions below take MKL's arguments, so native.py can hand the loops either).

   W (K, N) is laid out once in panels of NR columns: panel p holds, row after row, the NR
   values of W[k, p NR .. p NR + NR - 1] for k = 0 .. K-1, zeros past column N. A tile of MR rows
   of A by one panel keeps its MR x NR sums in registers over the whole of K, each step of k
   reading NR values of the panel and one value of each of the MR rows; the panel (K NR floats,
   32 KiB at K = 256 with AVX-512) stays in the first-level cache while every block of rows passes
   over it. The panels are shared among the threads, the same ones to each thread at every call,
   so that each thread's part of W stays in its own core's cache across the steps of a window.
   The vector type is GCC's and Clang's vector extension: the compiler picks the instructions
   for -march (AVX-512, AVX2, SSE, NEON). Each sum adds the products in the order of k, from 0,
   as one float each, so a product agrees with torch's to rounding. */

#if defined(__AVX512F__)
#define VL 16   /* floats in a vector */
#define MR 8    /* rows of a tile: 2 MR accumulators of the 32 vector registers */
#elif defined(__AVX__)
#define VL 8
#define MR 6    /* 12 accumulators of 16 registers */
#else
#define VL 4
#define MR 4
#endif
#define NR (2 * VL)  /* columns of a panel */

typedef float vec __attribute__((vector_size(VL * sizeof(float)), aligned(sizeof(float)), may_alias));

#ifdef _OPENMP
#define PARALLEL_PANELS \
    _Pragma("omp parallel for if ((int64_t)m * n * k >= (1 << 18) && !omp_in_parallel()) schedule(static)")
#else
#define PARALLEL_PANELS
#endif

#if defined(__GNUC__) && !defined(__clang__)
/* s += x * b as one fused multiply-add (GCC leaves it unfused in ISO C mode; Clang fuses it) */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif

/* C[rows, cols] = A[rows, K] panel (+ beta C), with R rows of sums (R a constant where it is inlined:
   MR, or 4, 2, 1 for a short block). row[i]: the rows of A; rows .. R-1 repeat row 0 and are dropped. */
static inline __attribute__((always_inline)) void tile(const int R, const float *const *row,
                                                       const float *restrict panel, int64_t K, float *c,
                                                       int64_t ldc, int64_t rows, int64_t cols, float beta)
{
    vec s0[MR], s1[MR];
#pragma GCC unroll 8
    for (int i = 0; i < R; i++)
        s0[i] = s1[i] = (vec){0};
    for (int64_t k = 0; k < K; k++) {
        vec b0 = *(const vec *)(panel + k * NR), b1 = *(const vec *)(panel + k * NR + VL);
#pragma GCC unroll 8
        for (int i = 0; i < R; i++) {
            float x = row[i][k];
            s0[i] += x * b0;
            s1[i] += x * b1;
        }
    }
    if (rows == R && cols == NR) {
#pragma GCC unroll 8
        for (int i = 0; i < R; i++) {
            vec *c0 = (vec *)(c + i * ldc), *c1 = (vec *)(c + i * ldc + VL);
            if (beta != 0.0f) {
                *c0 = beta * *c0 + s0[i];
                *c1 = beta * *c1 + s1[i];
            } else {
                *c0 = s0[i];
                *c1 = s1[i];
            }
        }
        return;
    }
    float part[MR][NR];
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) {
        *(vec *)part[i] = s0[i];
        *(vec *)(part[i] + VL) = s1[i];
    }
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++)
            c[i * ldc + j] = beta != 0.0f ? beta * c[i * ldc + j] + part[i][j] : part[i][j];
}

/* One block of up to MR rows by one panel, with the smallest tile that holds the rows. */
static void block(const float *a, int64_t lda, const float *panel, int64_t K, float *c, int64_t ldc,
                  int64_t rows, int64_t cols, float beta)
{
    const float *row[MR];
    for (int i = 0; i < MR; i++)
        row[i] = a + (i < rows ? i : 0) * lda;
    if (rows > 4)
        tile(MR, row, panel, K, c, ldc, rows, cols, beta);
    else if (rows > 2)
        tile(4, row, panel, K, c, ldc, rows, cols, beta);
    else if (rows == 2)
        tile(2, row, panel, K, c, ldc, rows, cols, beta);
    else
        tile(1, row, panel, K, c, ldc, rows, cols, beta);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* Bytes of W laid out for products with N = n columns and K = k rows (MKL's cblas_sgemm_pack_get_size). */
size_t charlm_sgemm_pack_get_size(int identifier, int m, int n, int k)
{
    (void)identifier, (void)m;
    return (size_t)((n + NR - 1) / NR) * NR * (size_t)k * sizeof(float);
}

/* W (k, n) = alpha src, laid out in panels into dest (MKL's cblas_sgemm_pack for the B matrix, row-major):
   src[kk * ld + j] with trans = 111 (no transpose), src[j * ld + kk] with trans = 112. The transposed
   source (the loops' W_hh^T) is copied in blocks of 16 of its rows by a panel's columns, each read along
   src's rows: one value at a time across them took 75 us at hidden 256 (W_ru^T) and 503 us at 512. */
void charlm_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float *src,
                       int ld, float *dest)
{
    (void)layout, (void)identifier, (void)m;
    const int64_t panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++) {
        float *restrict panel = dest + p * k * NR;
        const int64_t cols = n - p * NR < NR ? n - p * NR : NR;
        if (cols < NR)
            memset(panel, 0, (size_t)(k * NR) * sizeof(float));   /* zeros past column n */
        if (trans == 112) {
            for (int64_t k0 = 0; k0 < k; k0 += 16) {
                const int64_t k1 = k0 + 16 < k ? k0 + 16 : k;
                for (int64_t j = 0; j < cols; j++) {
                    const float *restrict s = src + (p * NR + j) * (int64_t)ld;
                    for (int64_t kk = k0; kk < k1; kk++)
                        panel[kk * NR + j] = alpha * s[kk];
                }
            }
        } else {
            for (int64_t kk = 0; kk < k; kk++) {
                const float *restrict s = src + kk * (int64_t)ld + p * NR;
                for (int64_t j = 0; j < cols; j++)
                    panel[kk * NR + j] = alpha * s[j];
            }
        }
    }
}

/* C (m, n) = A (m, k) W + beta C, W laid out by charlm_sgemm_pack; row-major (MKL's cblas_sgemm_compute
   with A not transposed and B packed, the only form the loops use). */
void charlm_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                          const float *b, int ldb, float beta, float *c, int ldc)
{
    (void)layout, (void)transa, (void)transb, (void)ldb;
    const int64_t panels = (n + NR - 1) / NR;
    PARALLEL_PANELS
    for (int64_t p = 0; p < panels; p++) {
        const int64_t cols = n - p * NR < NR ? n - p * NR : NR;
        for (int64_t i0 = 0; i0 < m; i0 += MR) {
            const int64_t rows = m - i0 < MR ? m - i0 : MR;
            block(a + i0 * (int64_t)lda, lda, b + p * NR * (int64_t)k, k, c + i0 * (int64_t)ldc + p * NR, ldc,
                  rows, cols, beta);
        }
    }
}
