/* The CPU dropout terms of the fused linear in one pass each way (loaded by dropout_native.py).
 *
 * The masks are dropout_hash.py's, bit for bit: block b of stream s has the keys z = sm(sm(sm(seed) ^ s) ^ b)
 * (sm: SplitMix64; k1 its low, k2 its high 32 bits); word w of a term's mask (elements 2w and 2w + 1 take its low
 * and high 16-bit halves) is h = (lowbias32(w mod 2^16)·M1 + k1·M1) ^ k2; h ^= h >> 15; h *= M2; h ^= h >> 16, with
 * b = w >> 16; an element is kept when its half, read as int16, is >= cut.
 * Why C: torch's ops write each term's masked input x ⊙ m (4 bytes an element) and read it back for a rank-r GEMM;
 * on a 2-core box those passes run at memory speed and cost ~4x the product itself. Here the masks and x ⊙ m stay
 * in L1, a few rows at a time, and feed the rank-r products directly; backward draws the masks again (cheaper
 * here than keeping them).
 *   forward   h[n, t·r + j] = scale · Σ_k x[n,k]·m_t[n,k]·A_t[j,k]
 *   backward  dx[n,k] += scale · m_t[n,k] · Σ_j g[t·r + j, n]·A_t[j,k]
 *             dA_t[j,k] = Σ_n g[t·r + j, n]·rstd[n]·m_t[n,k]·x[n,k]            (unscaled; the caller scales)
 * Threads are OpenMP's: built with -fopenmp, the library binds to the libgomp that torch already loaded (one
 * soname), so its parallel regions run on torch's own warm threads instead of competing with them for the cores.
 * Vectors are GCC/Clang vector extensions, lowered to whatever SIMD -march=native has. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define M1 0x7FEB352Du
#define M2 0x846CA68Bu
#define WORD_BLOCK_SHIFT 16  /* words under one pair of keys: dropout_hash.BLOCK_WORDS */
#define RP 8                 /* ranks are padded to a multiple of this */
#define RB 4                 /* rows per forward step (they share each load of A) */
#define BR 16                /* rows per backward block */
/* One vector is one machine register where the ISA has 32 of them: with AVX-512, 16 floats and RB·RG = 16
 * forward accumulators; elsewhere (AVX2's 16 registers, NEON) 8 floats and 8 accumulators, so that backward's RP
 * dA accumulators and forward's groups fit without spilling (64-byte vectors on AVX2 ran backward 2.3x slower
 * than the torch ops). */
#ifdef __AVX512F__
#define VL 16                /* floats per vector */
#define RG 4                 /* ranks per forward register group */
#else
#define VL 8
#define RG 2
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vq __attribute__((vector_size(16)));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline float vsum(vf v) {  /* a tree: halves added down to 4 lanes, then scalars */
    float lanes[VL]; memcpy(lanes, &v, sizeof v);
    for (int w = VL / 2; w >= 4; w /= 2)
        for (int i = 0; i < w; i++) lanes[i] += lanes[i + w];
    vq c; memcpy(&c, lanes, 16);
    return (c[0] + c[2]) + (c[1] + c[3]);
}

static uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

typedef struct {
    const float *x; int64_t N, K, Kp; int T, r, Rp;
    float *Ap;                             /* [T, Rp, Kp], zero-padded copies of the A_t */
    uint32_t *k1m, *k2; int64_t nblk;      /* [T, nblk]: k1·M1 and k2 of every block */
    int32_t cut; float scale;             /* int32: cut = 32768 (p rounds to 1) keeps nothing */
    float *h; int64_t hs0, hs1;            /* forward: h's element strides */
    const float *g; int64_t gs0, gs1;      /* backward: gH rank-major [T·r, N] */
    float *dx; const float *rstd;          /* dx [N, K] or NULL; rstd [N] or NULL */
    float *part;                           /* backward: per-thread dA partials [threads, T, Rp, Kp], or NULL */
    float *scratch; int64_t per_thread;    /* floats of scratch per thread */
} job_t;

/* m[0 .. Kp) = the 0/1 keep mask of row n of term t (zeros past K); words: K/2 + 2 scratch words. */
static void mask_row(const job_t *J, float *restrict m, uint32_t *restrict words, int64_t n, int t) {
    int64_t e0 = n * J->K, w0 = e0 >> 1, nw = ((e0 & 1) + J->K + 1) >> 1;
    const uint32_t *k1m = J->k1m + t * J->nblk, *k2 = J->k2 + t * J->nblk;
    for (int64_t i = 0; i < nw;) {
        int64_t blk = (w0 + i) >> WORD_BLOCK_SHIFT, stop = ((blk + 1) << WORD_BLOCK_SHIFT) - w0;
        if (stop > nw) stop = nw;
        uint32_t a = k1m[blk], b = k2[blk];
        #pragma omp simd
        for (int64_t q = i; q < stop; q++) {
            uint32_t j = (uint32_t)(w0 + q) & 0xFFFFu;  /* lowbias32(j), then the keyed round */
            j ^= j >> 16; j *= M1; j ^= j >> 15; j *= M2; j ^= j >> 16;
            uint32_t h = (j * M1 + a) ^ b;
            h ^= h >> 15; h *= M2; h ^= h >> 16;
            words[q] = h;
        }
        i = stop;
    }
    const int16_t *halves = (const int16_t *)words + (e0 & 1);  /* little-endian halves, as torch's int16 view */
    int32_t cut = J->cut;
    #pragma omp simd
    for (int64_t k = 0; k < J->K; k++) m[k] = halves[k] >= cut ? 1.0f : 0.0f;
    for (int64_t k = J->K; k < J->Kp; k++) m[k] = 0.f;
}

/* Forward over rows [n0, n1): RB rows at a time, every term while the rows' x is in L1. */
static void down_rows(const job_t *J, float *buf, int64_t n0, int64_t n1) {
    int64_t K = J->K, Kp = J->Kp; int Rp = J->Rp;
    float *xm = buf; uint32_t *words = (uint32_t *)(buf + RB * Kp);  /* xm [RB, Kp] */
    for (int64_t n = n0; n < n1; n += RB) {
        int rows = n1 - n < RB ? (int)(n1 - n) : RB;
        for (int t = 0; t < J->T; t++) {
            const float *A = J->Ap + (int64_t)t * Rp * Kp;
            for (int i = 0; i < RB; i++) {
                float *d = xm + i * Kp;
                if (i >= rows) { memset(d, 0, sizeof(float) * Kp); continue; }
                const float *xr = J->x + (n + i) * K;
                mask_row(J, d, words, n + i, t);
                #pragma omp simd
                for (int64_t k = 0; k < K; k++) d[k] *= xr[k];
            }
            for (int j0 = 0; j0 < Rp; j0 += RG) {
                vf s[RB][RG];
                for (int i = 0; i < RB; i++) for (int j = 0; j < RG; j++) s[i][j] = (vf){0};
                for (int64_t kc = 0; kc < Kp; kc += VL) {
                    vf u[RB];
                    for (int i = 0; i < RB; i++) u[i] = vload(xm + i * Kp + kc);
                    for (int j = 0; j < RG; j++) {
                        vf w = vload(A + (j0 + j) * Kp + kc);
                        for (int i = 0; i < RB; i++) s[i][j] += u[i] * w;
                    }
                }
                for (int i = 0; i < rows; i++)
                    for (int j = 0; j < RG && j0 + j < J->r; j++)
                        J->h[(n + i) * J->hs0 + (int64_t)(t * J->r + j0 + j) * J->hs1] = vsum(s[i][j]) * J->scale;
            }
        }
    }
}

/* dx[n + i] += scale · m_i ⊙ (Σ_j g_i[j]·A[j]) for the block's rows, four rows per sweep of A. */
static void back_dx(const job_t *J, const float *A, const float *gb, const float *mb, int64_t n, int rows) {
    int64_t K = J->K, Kp = J->Kp; int Rp = J->Rp; vf s = (vf){0} + J->scale;
    for (int i0 = 0; i0 < rows; i0 += 4) {
        int ni = rows - i0 < 4 ? rows - i0 : 4;
        for (int64_t kc = 0; kc < Kp; kc += VL) {
            vf acc[4] = {{0}, {0}, {0}, {0}};
            for (int j = 0; j < Rp; j++) {
                vf w = vload(A + j * Kp + kc);
                for (int i = 0; i < 4; i++) acc[i] += gb[(i0 + i) * Rp + j] * w;
            }
            for (int i = 0; i < ni; i++) {
                vf v = acc[i] * s * vload(mb + (i0 + i) * Kp + kc);
                float *dxr = J->dx + (n + i0 + i) * K + kc;
                if (kc + VL <= K) vstore(dxr, vload(dxr) + v);
                else for (int64_t k = 0; k < K - kc; k++) dxr[k] += v[k];
            }
        }
    }
}

/* part[t] += Σ_i gs[i]·xm[i] over the block's rows (gs: g·rstd), RP ranks per sweep. */
static void back_da(const job_t *J, float *da, const float *xmb, const float *gs, int rows) {
    int64_t Kp = J->Kp; int Rp = J->Rp;
    for (int j0 = 0; j0 < Rp; j0 += RP)
        for (int64_t kc = 0; kc < Kp; kc += VL) {
            vf acc[RP];
            for (int j = 0; j < RP; j++) acc[j] = vload(da + (j0 + j) * Kp + kc);
            for (int i = 0; i < rows; i++) {
                vf u = vload(xmb + i * Kp + kc);
                for (int j = 0; j < RP; j++) acc[j] += gs[i * Rp + j0 + j] * u;
            }
            for (int j = 0; j < RP; j++) vstore(da + (j0 + j) * Kp + kc, acc[j]);
        }
}

/* Backward over rows [n0, n1): blocks of BR rows, every term while the block's x and dx are in cache. */
static void back_rows(const job_t *J, float *buf, float *part, int64_t n0, int64_t n1) {
    int64_t K = J->K, Kp = J->Kp; int Rp = J->Rp;
    float *mb = buf, *xmb = mb + BR * Kp, *gb = xmb + BR * Kp, *gs = gb + BR * Rp;  /* [BR, Kp] ×2, [BR, Rp] ×2 */
    uint32_t *words = (uint32_t *)(gs + BR * Rp);
    for (int64_t n = n0; n < n1; n += BR) {
        int rows = n1 - n < BR ? (int)(n1 - n) : BR;
        for (int t = 0; t < J->T; t++) {
            const float *A = J->Ap + (int64_t)t * Rp * Kp;
            for (int i = 0; i < BR; i++) {
                float rs = i < rows && J->rstd ? J->rstd[n + i] : 1.f;
                for (int j = 0; j < Rp; j++) {
                    float gv = i < rows && j < J->r ? J->g[(int64_t)(t * J->r + j) * J->gs0 + (n + i) * J->gs1] : 0.f;
                    gb[i * Rp + j] = gv; gs[i * Rp + j] = gv * rs;
                }
            }
            for (int i = 0; i < rows; i++) {
                float *m = mb + i * Kp, *xm = xmb + i * Kp; const float *xr = J->x + (n + i) * K;
                mask_row(J, m, words, n + i, t);
                if (!part) continue;
                #pragma omp simd
                for (int64_t k = 0; k < K; k++) xm[k] = m[k] * xr[k];
                for (int64_t k = K; k < Kp; k++) xm[k] = 0.f;
            }
            if (J->dx) back_dx(J, A, gb, mb, n, rows);
            if (part) back_da(J, part + (int64_t)t * Rp * Kp, xmb, gs, rows);
        }
    }
}

/* Pads A and draws the keys into one allocation; every buffer is allocated before any work starts, so a failed
 * allocation returns -1 with nothing written. */
static float *setup(job_t *J, const float *const *A, uint64_t seed, int64_t stream, int threads, int64_t scratch,
                    int partials) {
    int64_t words = (J->N * J->K + 1) / 2, a_size = (int64_t)J->T * J->Rp * J->Kp;
    J->nblk = (words + (1 << WORD_BLOCK_SHIFT) - 1) >> WORD_BLOCK_SHIFT;
    J->per_thread = (scratch + 15) / 16 * 16;
    int64_t keys = (2 * J->T * J->nblk + 15) / 16 * 16;
    int64_t total = a_size + keys + J->per_thread * threads + (partials ? a_size * threads : 0);
    float *all = aligned_alloc(64, (size_t)total * sizeof(float));
    if (!all) return NULL;
    J->Ap = all;
    memset(J->Ap, 0, sizeof(float) * a_size);
    for (int t = 0; t < J->T; t++)
        for (int j = 0; j < J->r; j++)
            memcpy(J->Ap + ((int64_t)t * J->Rp + j) * J->Kp, A[t] + (int64_t)j * J->K, sizeof(float) * J->K);
    J->k1m = (uint32_t *)(all + a_size); J->k2 = J->k1m + J->T * J->nblk;
    for (int t = 0; t < J->T; t++) {
        uint64_t base = splitmix64(splitmix64(seed) ^ (uint64_t)(stream + t));
        for (int64_t b = 0; b < J->nblk; b++) {
            uint64_t z = splitmix64(base ^ (uint64_t)b);
            J->k1m[t * J->nblk + b] = (uint32_t)z * M1; J->k2[t * J->nblk + b] = (uint32_t)(z >> 32);
        }
    }
    J->scratch = all + a_size + keys;
    J->part = partials ? J->scratch + J->per_thread * threads : NULL;
    if (J->part) memset(J->part, 0, sizeof(float) * a_size * threads);
    return all;
}

static int clamp_threads(int64_t N, int threads) {
    int64_t most = N / 8 > 1 ? N / 8 : 1;  /* at least 8 rows a thread */
    if (threads > most) threads = (int)most;
    return threads < 1 ? 1 : threads;
}

static void init(job_t *J, const float *x, int64_t N, int64_t K, int T, int r, int cut, float scale) {
    memset(J, 0, sizeof *J);
    J->x = x; J->N = N; J->K = K; J->T = T; J->r = r; J->cut = cut; J->scale = scale;
    J->Rp = (r + RP - 1) / RP * RP; J->Kp = (K + VL - 1) / VL * VL;
}

/* h[:, t·r + j] for T terms of rank r (A: T pointers to [r, K] fp32); h's strides in elements. 0, or -1. */
int lk_drop_down(const float *x, int64_t N, int64_t K, int T, int r, const float *const *A, float *h,
                 int64_t hs0, int64_t hs1, uint64_t seed, int64_t stream, int cut, float scale, int threads) {
    job_t J; init(&J, x, N, K, T, r, cut, scale);
    J.h = h; J.hs0 = hs0; J.hs1 = hs1;
    threads = clamp_threads(N, threads);
    float *all = setup(&J, A, seed, stream, threads, (RB + 1) * J.Kp + 64, 0);
    if (!all) return -1;
    #pragma omp parallel num_threads(threads)
    {
        int id = omp_get_thread_num(), nt = omp_get_num_threads();
        down_rows(&J, J.scratch + J.per_thread * id, N * id / nt, N * (id + 1) / nt);
    }
    free(all);
    return 0;
}

/* dx += (when dx is given) and da = (when da is given: [T, r, K] fp32, written whole) the terms' backward. */
int lk_drop_back(const float *x, int64_t N, int64_t K, int T, int r, const float *const *A, const float *g,
                 int64_t gs0, int64_t gs1, float *dx, const float *rstd, float *da, uint64_t seed, int64_t stream,
                 int cut, float scale, int threads) {
    job_t J; init(&J, x, N, K, T, r, cut, scale);
    J.g = g; J.gs0 = gs0; J.gs1 = gs1; J.dx = dx; J.rstd = rstd;
    threads = clamp_threads(N, threads);
    float *all = setup(&J, A, seed, stream, threads, 2 * BR * J.Kp + 2 * BR * J.Rp + J.Kp + 64, da != NULL);
    if (!all) return -1;
    int64_t a_size = (int64_t)T * J.Rp * J.Kp;
    #pragma omp parallel num_threads(threads)
    {
        int id = omp_get_thread_num(), nt = omp_get_num_threads();
        back_rows(&J, J.scratch + J.per_thread * id, J.part ? J.part + a_size * id : NULL, N * id / nt,
                  N * (id + 1) / nt);
        if (da) {
            #pragma omp barrier
            #pragma omp for
            for (int64_t row = 0; row < (int64_t)T * r; row++) {  /* da[t, j] = Σ over threads' partials */
                int64_t src = (row / r * J.Rp + row % r) * J.Kp;
                for (int64_t k = 0; k < K; k++) {
                    float s = 0.f;
                    for (int p = 0; p < threads; p++) s += J.part[a_size * p + src + k];
                    da[row * K + k] = s;
                }
            }
        }
    }
    free(all);
    return 0;
}

/* 1 where the build has the vector ISA these loops were measured on (AVX2 or AVX-512): with SSE2 alone their
 * backward ran 1.9x slower than the torch ops; NEON is not measured yet. */
int lk_tuned(void) {
#if defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}
