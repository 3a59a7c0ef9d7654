"""Fused kernels for the re-rank, built at first use with the system's C compiler; where there is
none, or it fails, scoring and row checks stay in PyTorch, numpy and xxhash's Python binding.

- **Image → text block scores** (``i2t_block_scores``). After the similarity product, eager
  PyTorch makes about eight passes over a block's (captions × words × images × regions)
  similarities: LeakyReLU, the norm over regions, the scale, exp, the Gram-term product, two
  products with the attention and their sums over words. The kernel makes them over one image's
  (words × regions) slab at a time, which stays in the core's L1/L2 cache, and takes the Gram
  term ‖a_k‖² = e_k G e_kᵀ over half of the symmetric G.
- **The same from integer products** (``i2t_count_scores``): int8 regions multiplied with a
  caption's int8 word pieces (:mod:`hat.alignment`) give int32 counts; the kernel weighs each
  word's pieces together slab by slab, so no fp32 similarity block is written and read again.
  Where the CPU has AMX tiles (Intel's matrix units; ``i2t_tile_scores``) the products are
  taken there too, an image at a time, its counts never leaving the cache: ~3x PyTorch's int8
  product here (which runs oneDNN's VNNI GEMM, not the tiles), the same integers.
- **The same from fp32 products taken in bfloat16 AMX tiles** (``i2t_bf16_scores``): every
  value cut into three bfloat16 pieces (``bf16_tiles``: x = hi + mid + lo exactly), the six
  products of pieces that reach fp32's precision summed in the tiles' fp32 accumulators;
  ~1.7x an fp32 GEMM here, within fp32 rounding of it. An image at a time, against every
  block of captions, its pieces and products in cache.
- **One image against captions held ragged** (``i2t_ragged_scores``, a query image against the
  caption bank): every caption's real words back to back in one product with the regions, then
  caption by caption, its Gram matrix taken from its words; no sorting, blocks or padding.
- **pq codes to coordinates** (``pq_coordinates``): each code's centroid plus the image's mean,
  and each region's norm, in one pass instead of faiss's decode and two more over its output.
- **Image → text scores from pq codes** (``i2t_pq_scores``, a caption against a compressed
  gallery's candidates): a region's products with the words, and its squared norm, are sums of
  one table row per code (the words' products with that centroid, shared by every image; the
  image's own 2 s · c and ‖c‖² beside them), into the (words × regions) slab of the image →
  text kernel. The coordinates are never written: per level 100 candidates score in ~1.5 ms
  instead of ~4.3 ms decoded and multiplied (session 13).
- **Rows copied and hashed in one pass** (``gather_rows``): a query's candidate rows (an image's
  regions, a caption's tokens, every level) copied out of the memory-mapped segments, each part
  hashed (xxh3-64, xxhash's own C functions, found in the ``xxhash`` package's library) right
  after it is copied, while it is in cache, instead of a second pass over all of them.

It is plain C (no PyTorch headers), so it compiles in well under a second; the library is cached
under ``$XDG_CACHE_HOME/hat/kernels`` by a hash of its source and flags, and called through
ctypes, which releases the GIL. Float sums run in another order than PyTorch's: scores agree to
float rounding (the tests: within 2e-6 of PyTorch's; a gallery's re-rank within 1e-5 of its
decoded features' scores, on every precision); digests are bit for bit xxhash's.

:mod:`hat.alignment` scores in it at one PyTorch thread only (a server's model calls, as app.py
splits the cores; the speed targets): it runs on one thread, and with more PyTorch's own
elementwise steps run on all of them. ``HAT_NATIVE=0`` in the environment, or :func:`eager` in
code, keeps everything in PyTorch and numpy.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import xxhash

from hat.fileio import cache_home
from hat.mapped_rows import MappedRows

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __AVX512F__
enum { LANES = 16 };
#else
enum { LANES = 8 };
#endif
enum { VECTORS = 8, BLOCK = LANES * VECTORS }; /* 8 independent sums hide the FMA latency */
typedef float vf __attribute__((vector_size(4 * LANES)));

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Over regions k0 .. k0 + BLOCK of one image against one caption: dots[k] = sum_l e_lk x_lk
   and sq[k] = e_k G e_k^T over the words' half of the symmetric G (words with G_ll = 0 are
   zero vectors, padding: skipped). The partial sums stay in vector registers. */
static void sums(const float *e, const float *x, const float *g, int64_t L, int64_t K,
                 int64_t k0, float *dots, float *sq)
{
    vf d[VECTORS] = {0}, q[VECTORS] = {0}, a[VECTORS];
    for (int64_t l = 0; l < L; l++) {
        const float *el = e + l * K + k0, *xl = x + l * K + k0, *gl = g + l * L;
        if (gl[l] == 0.0f) continue;
#pragma GCC unroll 8
        for (int v = 0; v < VECTORS; v++) a[v] = (0.5f * gl[l]) * load(el + v * LANES);
        for (int64_t m = 0; m < l; m++) {
            const float *em = e + m * K + k0;
            float glm = gl[m];
#pragma GCC unroll 8
            for (int v = 0; v < VECTORS; v++) a[v] += glm * load(em + v * LANES);
        }
#pragma GCC unroll 8
        for (int v = 0; v < VECTORS; v++) {
            vf ev = load(el + v * LANES);
            d[v] += ev * load(xl + v * LANES);
            q[v] += 2.0f * ev * a[v];
        }
    }
#pragma GCC unroll 8
    for (int v = 0; v < VECTORS; v++) {
        store(dots + k0 + v * LANES, d[v]);
        store(sq + k0 + v * LANES, q[v]);
    }
}

/* The same over the last n < BLOCK regions, one at a time. */
static void tail_sums(const float *e, const float *x, const float *g, int64_t L, int64_t K,
                      int64_t k0, int64_t n, float *dots, float *sq)
{
    for (int64_t k = k0; k < k0 + n; k++) {
        float d = 0.0f, q = 0.0f;
        for (int64_t l = 0; l < L; l++) {
            const float *gl = g + l * L;
            if (gl[l] == 0.0f) continue;
            float a = 0.5f * gl[l] * e[l * K + k];
            for (int64_t m = 0; m < l; m++) a += gl[m] * e[m * K + k];
            d += e[l * K + k] * x[l * K + k];
            q += 2.0f * e[l * K + k] * a;
        }
        dots[k] = d;
        sq[k] = q;
    }
}

/* LeakyReLU(v)^2 over a row of K similarities, the row's part of a norm over regions. */
static inline float leaky_squares(const float *x, int64_t K, float slope)
{
    float ss = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        float y = x[k] > 0.0f ? x[k] : slope * x[k];
        ss += y * y;
    }
    return ss;
}

/* The score of one image against one caption from their (words x regions) slab x of
   region-word products, as scored (times the regions' scales), and each word's
   f_l = lambda / (||LeakyReLU(x_l)|| + eps): e = exp(f_l LeakyReLU(x_lk)) into work, then
   sum_k cos(v_k, a_k) / K. Words whose Gram diagonal is 0 are zero vectors (padding): they
   add nothing to any sum, so they are skipped. work: L K + 2 K floats. */
static float slab_score(const float *x, const float *f, const float *g, const float *n,
                        int64_t L, int64_t K, float slope, float eps, float *work)
{
    float *e = work, *dots = e + L * K, *sq = dots + K;
    for (int64_t l = 0; l < L; l++) {
        if (g[l * L + l] == 0.0f) { /* padding: its zero Gram entries meet these rows */
            memset(e + l * K, 0, (size_t)K * sizeof(float));
            continue;
        }
        const float *xl = x + l * K;
        float *el = e + l * K, fl = f[l];
        for (int64_t k = 0; k < K; k++) {
            float v = xl[k];
            el[k] = expf((v > 0.0f ? v : slope * v) * fl);
        }
    }
    int64_t k0 = 0;
    for (; k0 + BLOCK <= K; k0 += BLOCK) sums(e, x, g, L, K, k0, dots, sq);
    tail_sums(e, x, g, L, K, k0, K - k0, dots, sq);
    float total = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        float length = sqrtf(sq[k] > 0.0f ? sq[k] : 0.0f) * n[k];
        total += dots[k] / (length > eps ? length : eps);
    }
    return total / (float)K;
}

/* Image -> text scores of a block: sims (T, L, I, K) region-word products, scales (I, K) or
   NULL, gram (T, L, L) word Gram matrices, norms (I, K) region norms as scored; out (T, I);
   work: 2 L K + 2 K + L floats. */
void i2t_block_scores(const float *sims, const float *scales, const float *gram,
                      const float *norms, int64_t T, int64_t L, int64_t I, int64_t K,
                      float lam, float slope, float eps, float *work, float *out)
{
    float *x = work, *f = work + L * K, *rest = f + L;
    for (int64_t t = 0; t < T; t++) {
        const float *g = gram + t * L * L;
        for (int64_t i = 0; i < I; i++) {
            const float *sc = scales ? scales + i * K : 0;
            for (int64_t l = 0; l < L; l++) {
                const float *s = sims + ((t * L + l) * I + i) * K;
                float *xl = x + l * K, ss = 0.0f;
                for (int64_t k = 0; k < K; k++) {
                    float v = sc ? s[k] * sc[k] : s[k], y = v > 0.0f ? v : slope * v;
                    xl[k] = v;
                    ss += y * y;
                }
                f[l] = lam / (sqrtf(ss) + eps);
            }
            out[t * I + i] = slab_score(x, f, g, norms + i * K, L, K, slope, eps, rest);
        }
    }
}

/* One image's score against one caption from integer products: c (K, stride) int32 sums of
   each region with each word's P int8 pieces (word l's piece p in column l P + p), weights
   (L, P) the pieces' weights, so that a similarity is scale_k sum_p weights_lp c_k,lP+p.
   work: 2 L K + 2 K + L floats. */
static float count_score(const int32_t *c, int64_t stride, const float *weights, int64_t P,
                         const float *sc, const float *gram, const float *n, int64_t L,
                         int64_t K, float lam, float slope, float eps, float *work)
{
    float *x = work, *f = work + L * K, *rest = f + L;
    for (int64_t l = 0; l < L; l++) {
        float *xl = x + l * K;
        for (int64_t k = 0; k < K; k++) xl[k] = 0.0f;
        for (int64_t p = 0; p < P; p++) {
            const int32_t *cp = c + l * P + p;
            float w = weights[l * P + p];
            for (int64_t k = 0; k < K; k++) xl[k] += w * (float)cp[k * stride];
        }
        if (sc)
            for (int64_t k = 0; k < K; k++) xl[k] *= sc[k];
        f[l] = lam / (sqrtf(leaky_squares(xl, K, slope)) + eps);
    }
    return slab_score(x, f, gram, n, L, K, slope, eps, rest);
}

/* The scores of one caption against int8 regions multiplied in integers: counts (I, K, L P),
   scales (I, K) or NULL, gram (L, L), norms (I, K); out (I). */
void i2t_count_scores(const int32_t *counts, const float *weights, int64_t P,
                      const float *scales, const float *gram, const float *norms, int64_t L,
                      int64_t I, int64_t K, float lam, float slope, float eps, float *work,
                      float *out)
{
    for (int64_t i = 0; i < I; i++)
        out[i] = count_score(counts + i * K * L * P, L * P, weights, P,
                             scales ? scales + i * K : 0, gram, norms + i * K, L, K, lam,
                             slope, eps, work);
}

/* The same with the integer products taken here, an image at a time, in the CPU's AMX tiles
   (Intel's matrix units): regions[i] image i's (K, D) int8 values, wherever they lie (a
   memory-mapped gallery row), K % 16 == 0 and D % 64 == 0; tiles the
   caption's L P pieces in NB blocks of 16 columns, each block D / 64 tiles of 16 rows x 64
   bytes in the tiles' order (four consecutive products of a column side by side). An image's
   counts (K, 16 NB) int32 stay in cache (scratch) for count_score. Only called where
   amx_ready() said yes. */
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

/* 1 where the CPU has AMX (tiles, int8 and bfloat16 products) and AVX-512 (F, BW) and Linux
   hands this process the tiles' state (it does only when asked: arch_prctl); else 0. */
int amx_ready(void)
{
    unsigned a, b, c, d; /* leaf 7: AVX-512 F and BW in b, AMX bf16, tiles and int8 in d */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if ((b & (1u << 16 | 1u << 30)) != (1u << 16 | 1u << 30)) return 0;
    const unsigned amx = 1u << 22 | 1u << 24 | 1u << 25;
    if ((d & amx) != amx) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0 .. n - 1 of 16 rows x 64 bytes. The barrier keeps the compiler from dropping the
   config's stores (GCC 12 has, in a function whose only reader of it is ldtilecfg). */
__attribute__((target("amx-tile")))
static void load_tile_config(int n)
{
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < n; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile,amx-int8")))
static void tile_counts(const int8_t *regions, const int8_t *tiles, int64_t NB, int64_t K,
                        int64_t D, int32_t *counts)
{
    const int64_t steps = D / 64, S = 16 * NB;
    for (int64_t m = 0; m < K; m += 16) {
        const int8_t *a = regions + m * D;
        for (int64_t nb = 0; nb < NB; nb++) {
            const int8_t *b = tiles + nb * steps * 1024;
            _tile_zero(2);
            for (int64_t s = 0; s < steps; s++) {
                _tile_loadd(0, a + s * 64, D);
                _tile_loadd(1, b + s * 1024, 64);
                _tile_dpbssd(2, 0, 1);
            }
            _tile_stored(2, counts + m * S + nb * 16, S * 4);
        }
    }
}

__attribute__((target("amx-tile,amx-int8")))
void i2t_tile_scores(const int8_t *const *regions, const int8_t *tiles, int64_t NB, int64_t D,
                     const float *weights, int64_t P, const float *scales, const float *gram,
                     const float *norms, int64_t L, int64_t I, int64_t K, float lam,
                     float slope, float eps, float *work, int32_t *scratch, float *out)
{
    load_tile_config(3);
    for (int64_t i = 0; i < I; i++) {
        tile_counts(regions[i], tiles, NB, K, D, scratch);
        out[i] = count_score(scratch, 16 * NB, weights, P, scales ? scales + i * K : 0, gram,
                             norms + i * K, L, K, lam, slope, eps, work);
    }
    _tile_release();
}

/* fp32 rows in bfloat16 tiles, three pieces each: x = hi + mid + lo, each piece the nearest
   bfloat16 to what the ones before left (so the sum keeps x's 24 bits), products of pieces
   exact in fp32. rows (N, D), N % 16 == 0, D % 32 == 0; out (3, N / 16, D / 32, 16, 32):
   piece, 16 rows, 32 deep. With vnni each 16 x 32 block is stored as AMX's second operand
   wants it (row p: each of the 16 rows' values 2p and 2p + 1 side by side: the block's pairs
   transposed), else as it lies (the first operand). */
__attribute__((target("avx512f,avx512bw")))
static inline __m512 bf16_rest(__m512 x, __m512i *piece)
{
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    *piece = _mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_sub_ps(x, _mm512_castsi512_ps(*piece));
}

__attribute__((target("avx512f")))
static void transpose16(__m512i r[16])
{
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

__attribute__((target("avx512f,avx512bw")))
void bf16_tiles(const float *rows, int64_t N, int64_t D, int64_t vnni, uint16_t *out)
{
    const int64_t steps = D / 32, piece = N * D;
    /* the upper halves (the bfloat16s) of two vectors of 16 floats, in order */
    const __m512i odd_words = _mm512_set_epi16(
        63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
        31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    float rest[16][32]; /* what the pieces so far left of a block, as floats */
    for (int64_t n = 0; n < N; n += 16)
        for (int64_t s = 0; s < steps; s++) {
            for (int r = 0; r < 16; r++) memcpy(rest[r], rows + (n + r) * D + s * 32, 128);
            for (int q = 0; q < 3; q++) {
                __m512i p[16], pa, pb;
                for (int r = 0; r < 16; r++) {
                    _mm512_storeu_ps(rest[r], bf16_rest(_mm512_loadu_ps(rest[r]), &pa));
                    _mm512_storeu_ps(rest[r] + 16, bf16_rest(_mm512_loadu_ps(rest[r] + 16), &pb));
                    p[r] = _mm512_permutex2var_epi16(pa, odd_words, pb);
                }
                if (vnni) transpose16(p);
                uint16_t *o = out + q * piece + (n / 16 * steps + s) * 512;
                for (int r = 0; r < 16; r++) _mm512_storeu_si512(o + 32 * r, p[r]);
            }
        }
}

/* x (W, K) gets the products of word tiles a .. a + 16 wn with region tiles b .. b + 16 rn
   (wn, rn 1 or 2: constants where inlined), D = 32 steps deep, summed over the products of
   pieces that reach fp32's precision (pairs of ranks up to 2; a piece's rank is how far down
   it lies), the smallest first: words (3, W / 16, steps, 16, 32), regions one image's in VNNI
   pieces (3, K / 16, steps, 16, 32). A word piece is loaded once for the region pieces it
   meets. */
__attribute__((target("amx-tile,amx-bf16"), always_inline))
static inline void tile_products(const uint16_t *words, int64_t W, const uint16_t *regions,
                                 int64_t K, int64_t steps, int64_t a, int64_t b, int wn, int rn,
                                 float *x)
{
    const int64_t wp = W * steps * 32, rp = K * steps * 32;
    _tile_zero(4);
    if (rn > 1) _tile_zero(5);
    if (wn > 1) _tile_zero(6);
    if (wn > 1 && rn > 1) _tile_zero(7);
    for (int64_t s = 0; s < steps; s++)
        for (int rank = 2; rank >= 0; rank--) {
            const uint16_t *pa = words + rank * wp + (a / 16 * steps + s) * 512;
            _tile_loadd(0, pa, 64);
            if (wn > 1) _tile_loadd(1, pa + steps * 512, 64);
            for (int other = 2 - rank; other >= 0; other--) {
                const uint16_t *pb = regions + other * rp + (b / 16 * steps + s) * 512;
                _tile_loadd(2, pb, 64);
                _tile_dpbf16ps(4, 0, 2);
                if (rn > 1) {
                    _tile_loadd(3, pb + steps * 512, 64);
                    _tile_dpbf16ps(5, 0, 3);
                }
                if (wn > 1) _tile_dpbf16ps(6, 1, 2);
                if (wn > 1 && rn > 1) _tile_dpbf16ps(7, 1, 3);
            }
        }
    float *x0 = x + a * K + b;
    _tile_stored(4, x0, K * 4);
    if (rn > 1) _tile_stored(5, x0 + 16, K * 4);
    if (wn > 1) _tile_stored(6, x0 + 16 * K, K * 4);
    if (wn > 1 && rn > 1) _tile_stored(7, x0 + 16 * K + 16, K * 4);
}

/* Image -> text scores from fp32 products taken in bfloat16 tiles: regions (I, K, D) fp32
   (K % 16 == 0, D % 32 == 0), times scales (I, K) where not NULL, norms (I, K) the scaled
   regions' norms, against C blocks of captions: block c's T L words (captions cut to L,
   padding zero vectors) in bf16_tiles' pieces words[c] of W rows (zeros after the T L),
   sizes[c] = {W, T, L}, grams[c] (T, L, L); out (sum T, I), the blocks' captions in order.
   An image is cut into pieces once (pieces: 3 K D), and its (W, K) products with each block
   stay in cache (work) while that block's captions are scored. work: W K + 2 L K + 2 K + L
   floats for the largest W and L. */
__attribute__((target("amx-tile,amx-bf16")))
void i2t_bf16_scores(const float *regions, const float *scales, const float *norms, int64_t I,
                     int64_t K, int64_t D, int64_t C, const uint16_t *const *words,
                     const int64_t *sizes, const float *const *grams, float lam, float slope,
                     float eps, uint16_t *pieces, float *work, float *out)
{
    const int64_t steps = D / 32;
    int64_t wide = 0;
    for (int64_t c = 0; c < C; c++) wide = sizes[3 * c] > wide ? sizes[3 * c] : wide;
    float *x = work, *f = x + wide * K;
    load_tile_config(8);
    for (int64_t i = 0; i < I; i++) {
        bf16_tiles(regions + i * K * D, K, D, 1, pieces);
        const float *sc = scales ? scales + i * K : 0;
        int64_t first = 0;
        for (int64_t c = 0; c < C; c++) {
            const int64_t W = sizes[3 * c], T = sizes[3 * c + 1], L = sizes[3 * c + 2];
            const uint16_t *w = words[c];
            int64_t b = 0;
            for (; b + 32 <= K; b += 32) {
                int64_t a = 0;
                for (; a + 32 <= W; a += 32) tile_products(w, W, pieces, K, steps, a, b, 2, 2, x);
                if (a < W) tile_products(w, W, pieces, K, steps, a, b, 1, 2, x);
            }
            if (b < K) {
                int64_t a = 0;
                for (; a + 32 <= W; a += 32) tile_products(w, W, pieces, K, steps, a, b, 2, 1, x);
                if (a < W) tile_products(w, W, pieces, K, steps, a, b, 1, 1, x);
            }
            for (int64_t t = 0; t < T; t++) {
                float *xt = x + t * L * K;
                for (int64_t l = 0; l < L; l++) {
                    float *xl = xt + l * K;
                    if (sc)
                        for (int64_t k = 0; k < K; k++) xl[k] *= sc[k];
                    f[l] = lam / (sqrtf(leaky_squares(xl, K, slope)) + eps);
                }
                out[(first + t) * I + i] = slab_score(xt, f, grams[c] + t * L * L, norms + i * K,
                                                      L, K, slope, eps, f + L);
            }
            first += T;
        }
    }
    _tile_release();
}
#else /* no AMX intrinsics here: amx_ready() says so, and the tile kernels are never called */
int amx_ready(void) { return 0; }

void i2t_tile_scores(const int8_t *const *regions, const int8_t *tiles, int64_t NB, int64_t D,
                     const float *weights, int64_t P, const float *scales, const float *gram,
                     const float *norms, int64_t L, int64_t I, int64_t K, float lam,
                     float slope, float eps, float *work, int32_t *scratch, float *out)
{
}
void bf16_tiles(const float *rows, int64_t N, int64_t D, int64_t vnni, uint16_t *out) {}

void i2t_bf16_scores(const float *regions, const float *scales, const float *norms, int64_t I,
                     int64_t K, int64_t D, int64_t C, const uint16_t *const *words,
                     const int64_t *sizes, const float *const *grams, float lam, float slope,
                     float eps, uint16_t *pieces, float *work, float *out)
{
}
#endif

/* sq[l] = ||sum_k w_lk v_k||^2 for words l < L (at most WORDS): the attended vectors of a block
   of words, held in registers a slice of D at a time, never written out. w (L, K) with rows
   of stride K, v (K, D). */
enum { WORDS = 8, SLICE = 2 * LANES };
static void attended_squares(const float *w, const float *v, int64_t L, int64_t K, int64_t D,
                             float *sq)
{
    for (int64_t l = 0; l < L; l++) sq[l] = 0.0f;
    int64_t d0 = 0;
    for (; d0 + SLICE <= D; d0 += SLICE) {
        vf acc[WORDS][2] = {{0}};
        for (int64_t k = 0; k < K; k++) {
            vf v0 = load(v + k * D + d0), v1 = load(v + k * D + d0 + LANES);
            for (int64_t l = 0; l < L; l++) {
                float wl = w[l * K + k];
                acc[l][0] += wl * v0;
                acc[l][1] += wl * v1;
            }
        }
        for (int64_t l = 0; l < L; l++) {
            vf q = acc[l][0] * acc[l][0] + acc[l][1] * acc[l][1];
            for (int j = 0; j < LANES; j++) sq[l] += q[j];
        }
    }
    for (int64_t d = d0; d < D; d++) /* the rest of D, one number at a time */
        for (int64_t l = 0; l < L; l++) {
            float a = 0.0f;
            for (int64_t k = 0; k < K; k++) a += w[l * K + k] * v[k * D + d];
            sq[l] += a * a;
        }
}

/* Text -> image scores of a block (words attend to regions): sims (T, L, I, K) region-word
   products of regions (I, K, D) (times scales (I, K) where not NULL), word_norms (T, L),
   real (T, L) 1 for a real word and 0 for padding (padded words are zero vectors); out (T, I).
   For each pair: e_lk = exp(lambda LeakyReLU(x_lk) / ||LeakyReLU(x_.k)||) with the norm over
   words, and the mean over real words of cos(t_l, a_l) = sum_k e_lk x_lk / (||t_l|| ||a_l||),
   a_l = sum_k e_lk v_k. work: 2 L K + K + L floats. */
void t2i_block_scores(const float *sims, const float *regions, const float *scales,
                      const float *word_norms, const float *real, int64_t T, int64_t L,
                      int64_t I, int64_t K, int64_t D, float lam, float slope, float eps,
                      float *work, float *out)
{
    float *x = work, *e = x + L * K, *f = e + L * K, *sq = f + K;
    for (int64_t t = 0; t < T; t++) {
        const float *rl = real + t * L, *nl = word_norms + t * L;
        float words = 0.0f;
        for (int64_t l = 0; l < L; l++) words += rl[l];
        for (int64_t i = 0; i < I; i++) {
            const float *sc = scales ? scales + i * K : 0;
            for (int64_t k = 0; k < K; k++) f[k] = 0.0f;
            for (int64_t l = 0; l < L; l++) {
                const float *s = sims + ((t * L + l) * I + i) * K;
                float *xl = x + l * K;
                for (int64_t k = 0; k < K; k++) {
                    float value = sc ? s[k] * sc[k] : s[k];
                    float y = value > 0.0f ? value : slope * value;
                    xl[k] = value;
                    f[k] += y * y;
                }
            }
            for (int64_t k = 0; k < K; k++) f[k] = lam / (sqrtf(f[k]) + eps);
            for (int64_t l = 0; l < L; l++) {
                const float *xl = x + l * K;
                float *el = e + l * K;
                for (int64_t k = 0; k < K; k++) {
                    float value = xl[k];
                    el[k] = expf((value > 0.0f ? value : slope * value) * f[k]);
                }
            }
            float total = 0.0f, dots[WORDS];
            for (int64_t l0 = 0; l0 < L; l0 += WORDS) {
                int64_t n = L - l0 < WORDS ? L - l0 : WORDS;
                for (int64_t j = 0; j < n; j++) { /* t_l . a_l, then a_l's weights: e_lk s_k */
                    float *el = e + (l0 + j) * K;
                    const float *xl = x + (l0 + j) * K;
                    float dot = 0.0f;
                    for (int64_t k = 0; k < K; k++) dot += el[k] * xl[k];
                    dots[j] = dot;
                    if (sc)
                        for (int64_t k = 0; k < K; k++) el[k] *= sc[k];
                }
                attended_squares(e + l0 * K, regions + i * K * D, n, K, D, sq);
                for (int64_t j = 0; j < n; j++) {
                    if (rl[l0 + j] == 0.0f) continue;
                    float length = nl[l0 + j] * sqrtf(sq[j]);
                    total += dots[j] / (length > eps ? length : eps);
                }
            }
            out[t * I + i] = total / (words > 1.0f ? words : 1.0f);
        }
    }
}

/* Image -> text scores of one image against T captions held ragged: sims (N, K) the products
   of the captions' N real words, back to back (caption t's are rows offsets[t] ..
   offsets[t + 1]), with the image's K regions; words (N, D) those words, whose Gram matrix
   each caption's slab needs; norms (K) the regions' norms; out (T). No padding is multiplied
   or skipped. work: W K + 2 K + W + W W floats, W the longest caption's words. */
void i2t_ragged_scores(const float *sims, const float *words, const int64_t *offsets,
                       int64_t T, int64_t K, int64_t D, int64_t W, const float *norms,
                       float lam, float slope, float eps, float *work, float *out)
{
    float *g = work, *f = g + W * W, *rest = f + W;
    for (int64_t t = 0; t < T; t++) {
        int64_t first = offsets[t], L = offsets[t + 1] - first;
        const float *x = sims + first * K, *w = words + first * D;
        for (int64_t l = 0; l < L; l++) {
            for (int64_t m = 0; m <= l; m++) {
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += w[l * D + d] * w[m * D + d];
                g[l * L + m] = g[m * L + l] = dot;
            }
            f[l] = lam / (sqrtf(leaky_squares(x + l * K, K, slope)) + eps);
        }
        out[t] = slab_score(x, f, g, norms, L, K, slope, eps, rest);
    }
}

/* pq codes to coordinates in one pass: region r = i K + k of image i has M one-byte codes,
   code c of sub-quantiser m standing for centroids[(m 256 + c) dsub ..] (dsub numbers);
   out (I K, M dsub + extra) holds the decoded numbers plus shift[i] (the image's mean in the
   basis, M dsub numbers) and, where own is not NULL (extra = 1), own[i] last; norms (I K)
   each row's Euclidean norm, taken while it is in cache. */
void pq_coordinates(const uint8_t *codes, int64_t I, int64_t K, int64_t M, int64_t dsub,
                    const float *centroids, const float *shift, const float *own, float *out,
                    float *norms)
{
    const int64_t kept = M * dsub, width = kept + (own ? 1 : 0);
    for (int64_t i = 0; i < I; i++) {
        const float *sh = shift + i * kept;
        for (int64_t k = 0; k < K; k++) {
            const uint8_t *c = codes + (i * K + k) * M;
            float *o = out + (i * K + k) * width;
            if (dsub == 3) /* the codec's: a constant the compiler unrolls */
                for (int64_t m = 0; m < M; m++) {
                    const float *centroid = centroids + (m * 256 + c[m]) * 3;
                    o[3 * m] = centroid[0] + sh[3 * m];
                    o[3 * m + 1] = centroid[1] + sh[3 * m + 1];
                    o[3 * m + 2] = centroid[2] + sh[3 * m + 2];
                }
            else
                for (int64_t m = 0; m < M; m++) {
                    const float *centroid = centroids + (m * 256 + c[m]) * dsub;
                    for (int64_t d = 0; d < dsub; d++)
                        o[m * dsub + d] = centroid[d] + sh[m * dsub + d];
                }
            float ss = 0.0f;
            for (int64_t d = 0; d < kept; d++) ss += o[d] * o[d];
            if (own) {
                o[kept] = own[i];
                ss += own[i] * own[i];
            }
            norms[i * K + k] = sqrtf(ss);
        }
    }
}

/* One pq-coded region's lookups (pq_lookups: NV vectors of word lanes, a compile-time
   constant where it is inlined, so the sums stay in registers): each word's product with the
   region's coordinates (offset: the image's share; row (m, c) of lut its product with centroid
   c of sub-vector m), and the region's squared norm less the image's share, from tab. Four sums
   each quarter the add chains. */
static inline __attribute__((always_inline)) float
pq_lookups(const uint8_t *c, int64_t M, const float *lut, const float *tab, const float *offset,
           float *sims, const int NV)
{
    enum { SUMS = 4 }; /* independent sums: a quarter of each add chain */
    vf a[SUMS][8];
    float cross[SUMS] = {0.0f};
    for (int v = 0; v < NV; v++) {
        a[0][v] = load(offset + v * LANES);
        for (int j = 1; j < SUMS; j++) a[j][v] = (vf){0};
    }
    int64_t m = 0;
    for (; m + SUMS <= M; m += SUMS)
#pragma GCC unroll 4
        for (int j = 0; j < SUMS; j++) {
            const int64_t row = (m + j) * 256 + c[m + j];
            cross[j] += tab[row];
            for (int v = 0; v < NV; v++) a[j][v] += load(lut + row * NV * LANES + v * LANES);
        }
    for (; m < M; m++) {
        const int64_t row = m * 256 + c[m];
        cross[0] += tab[row];
        for (int v = 0; v < NV; v++) a[0][v] += load(lut + row * NV * LANES + v * LANES);
    }
    for (int v = 0; v < NV; v++) store(sims + v * LANES, (a[0][v] + a[1][v]) + (a[2][v] + a[3][v]));
    return (cross[0] + cross[1]) + (cross[2] + cross[3]);
}

/* Image -> text scores of pq-coded regions against one caption, the codes never decoded
   (a query's candidates in a compressed gallery). A region's coordinates are y = s_i + c:
   c the concatenated centroids of its codes, s_i its image's shift (then the image's own
   coordinate). lut (M, 256, W): word l's product with centroid (m, c) in lane l < L;
   offsets (I, W): each word's product with image i's shift and own row; base (I): ||s_i||^2
   plus the own coordinate's square. The image's table tab[m][c] = ||centroid_mc||^2 +
   2 s_i,m . centroid_mc (cent_t (M, dsub, 256) centroids by dimension, sq (M, 256) their
   squared norms) gives ||y||^2 = base_i + sum_m tab[m][c_m]. codes (I, K, M); shift
   (I, M dsub); gram (L, L) the words' Gram matrix; out (I). W = NV LANES, NV <= 8.
   work: 256 M + 2 L K + 3 K + L + W floats. */
void i2t_pq_scores(const uint8_t *codes, int64_t I, int64_t K, int64_t M, int64_t dsub,
                   const float *lut, int64_t W, const float *offsets, const float *base,
                   const float *cent_t, const float *sq, const float *shift, const float *gram,
                   int64_t L, float lam, float slope, float eps, float *work, float *out)
{
    float *tab = work, *x = tab + 256 * M, *n = x + L * K, *f = n + K, *rest = f + L;
    float *sims = rest + L * K + 2 * K; /* past slab_score's work */
    for (int64_t i = 0; i < I; i++) {
        const float *sh = shift + i * M * dsub, *off = offsets + i * W;
        for (int64_t m = 0; m < M; m++) {
            float *t = tab + m * 256;
            for (int64_t c = 0; c < 256; c++) t[c] = sq[m * 256 + c];
            for (int64_t d = 0; d < dsub; d++) {
                const float s = 2.0f * sh[m * dsub + d], *ct = cent_t + (m * dsub + d) * 256;
                for (int64_t c = 0; c < 256; c++) t[c] += s * ct[c];
            }
        }
        for (int64_t k = 0; k < K; k++) {
            const uint8_t *c = codes + (i * K + k) * M;
            float q;
            switch (W / LANES) {
            case 1: q = pq_lookups(c, M, lut, tab, off, sims, 1); break;
            case 2: q = pq_lookups(c, M, lut, tab, off, sims, 2); break;
            case 3: q = pq_lookups(c, M, lut, tab, off, sims, 3); break;
            case 4: q = pq_lookups(c, M, lut, tab, off, sims, 4); break;
            case 5: q = pq_lookups(c, M, lut, tab, off, sims, 5); break;
            case 6: q = pq_lookups(c, M, lut, tab, off, sims, 6); break;
            case 7: q = pq_lookups(c, M, lut, tab, off, sims, 7); break;
            default: q = pq_lookups(c, M, lut, tab, off, sims, 8); break;
            }
            for (int64_t l = 0; l < L; l++) x[l * K + k] = sims[l];
            q += base[i];
            n[k] = sqrtf(q > 0.0f ? q : 0.0f);
        }
        for (int64_t l = 0; l < L; l++)
            f[l] = lam / (sqrtf(leaky_squares(x + l * K, K, slope)) + eps);
        out[i] = slab_score(x, f, gram, n, L, K, slope, eps, rest);
    }
}

/* xxh3-64 streaming functions (the xxhash library's, passed in by address). */
typedef int (*xxh_reset)(void *state);
typedef int (*xxh_update)(void *state, const void *data, size_t length);
typedef uint64_t (*xxh_digest)(const void *state);

/* Rows of P arrays copied back to back into dst[p]: row r is items starts[r] ..
   starts[r] + counts[r] of every array (item_bytes[p] bytes an item: an image's regions, a
   caption's tokens); an array whose dst[p] is NULL is left where it is (read in place later).
   Where state is not NULL, each row's digest, its arrays' parts hashed in order, into
   digests[r]: each part right after it is copied, while it is in cache, so the rows pass
   through memory once. */
void gather_rows(int64_t P, char *const *src, char *const *dst, const int64_t *item_bytes,
                 const int64_t *starts, const int64_t *counts, int64_t n, void *state,
                 xxh_reset reset, xxh_update update, xxh_digest digest, uint64_t *digests)
{
    int64_t done = 0;
    for (int64_t r = 0; r < n; r++) {
        if (state) reset(state);
        for (int64_t p = 0; p < P; p++) {
            size_t length = (size_t)(counts[r] * item_bytes[p]);
            const char *from = src[p] + starts[r] * item_bytes[p];
            if (dst[p]) {
                char *to = dst[p] + done * item_bytes[p];
                memcpy(to, from, length);
                from = to;
            }
            if (state) update(state, from, length);
        }
        if (state) digests[r] = digest(state);
        done += counts[r];
    }
}
"""
# Vector instructions the compiled kernel may use, as PyTorch found them on this CPU.
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
# -ffast-math lets the sums over regions and expf vectorise (glibc's vector maths); it is given
# to the compile step only: linked with it, the library would switch the whole process's
# floats to flush-to-zero when loaded.
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fPIC", "-fno-plt"]
DISABLE = "HAT_NATIVE"  # environment variable: "0" keeps scoring in PyTorch

_lock = threading.Lock()
_kernels: Kernels | None = None
_tried = False
_enabled = True
_amx = True  # False inside without_amx()


@dataclass(frozen=True)
class Kernels:
    """The compiled library's functions, their argument types set."""

    block_scores: Callable  # i2t_block_scores
    count_scores: Callable  # i2t_count_scores
    t2i_scores: Callable  # t2i_block_scores
    ragged_scores: Callable  # i2t_ragged_scores
    pq_coordinates: Callable
    pq_scores: Callable  # i2t_pq_scores
    gather_rows: Callable
    tile_scores: Callable  # i2t_tile_scores: only where ``amx``
    bf16_tiles: Callable  # only where ``amx``
    bf16_scores: Callable  # i2t_bf16_scores: only where ``amx``
    amx: bool  # the CPU has AMX tiles and the OS lets this process use them


def _flags() -> list[str]:
    return COMPILE_FLAGS + ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _build(compiler: str, target: Path) -> None:
    """Compile :data:`SOURCE` into the shared library ``target``, atomically (processes may
    build it side by side)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source, objects, library = (Path(work) / n for n in ("k.c", "k.o", "k.so"))
        source.write_text(SOURCE)
        run = {"check": True, "capture_output": True, "timeout": 120}
        subprocess.run([compiler, *_flags(), "-c", str(source), "-o", str(objects)], **run)
        subprocess.run([compiler, "-shared", str(objects), "-o", str(library), "-lm"], **run)
        os.replace(library, target)


# Each kernel's C function and its arguments: p a pointer, s an int64_t, f a float.
SIGNATURES = {
    "block_scores": ("i2t_block_scores", "pppp ssss fff pp"),
    "count_scores": ("i2t_count_scores", "pps ppp sss fff pp"),
    "t2i_scores": ("t2i_block_scores", "ppppp sssss fff pp"),
    "ragged_scores": ("i2t_ragged_scores", "ppp ssss p fff pp"),
    "pq_coordinates": ("pq_coordinates", "p ssss ppppp"),
    "pq_scores": ("i2t_pq_scores", "p ssss ps pppppp s fff pp"),
    "gather_rows": ("gather_rows", "s ppppp s ppppp"),
    "tile_scores": ("i2t_tile_scores", "ppss psppp sss fff ppp"),
    "bf16_tiles": ("bf16_tiles", "psssp"),
    "bf16_scores": ("i2t_bf16_scores", "ppp sss sppp fff ppp"),
}
C_TYPES = {"p": ctypes.c_void_p, "s": ctypes.c_int64, "f": ctypes.c_float}


def _typed(function: Callable, signature: str) -> Callable:
    function.argtypes = [C_TYPES[kind] for kind in signature.replace(" ", "")]
    function.restype = None
    return function


def _load() -> Kernels | None:
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found: scoring stays in PyTorch")
        return None
    key = hashlib.sha256("\0".join([SOURCE, compiler, *_flags()]).encode()).hexdigest()[:16]
    target = cache_home() / "kernels" / f"hat-{key}.so"
    try:
        if not target.is_file():
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
        return Kernels(
            **{
                field: _typed(getattr(library, symbol), signature)
                for field, (symbol, signature) in SIGNATURES.items()
            },
            amx=library.amx_ready() == 1,
        )
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning(
            "the fused scoring kernel could not be built (%s %s): scoring stays in PyTorch",
            exc,
            detail.decode(errors="replace")[-500:],
        )
        return None


def kernels() -> Kernels | None:
    """The compiled kernels (built, or loaded from the cache, on the first call: a server calls
    this at start-up), or None where scoring stays in PyTorch."""
    global _kernels, _tried
    if not _enabled or os.environ.get(DISABLE) == "0":
        return None
    with _lock:
        if not _tried:
            _kernels, _tried = _load(), True
    if _kernels is not None and _kernels.amx and not _amx:
        return replace(_kernels, amx=False)
    return _kernels


@contextmanager
def eager() -> Iterator[None]:
    """Score in PyTorch inside this block (benchmarks compare both ways; tests check them)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


@contextmanager
def without_amx() -> Iterator[None]:
    """Keep every product out of the AMX tiles inside this block: fp32 products as on a CPU
    without them (benchmarks compare both ways; tests check them)."""
    global _amx
    before, _amx = _amx, False
    try:
        yield
    finally:
        _amx = before


def _address(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _floats(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors as the kernels read them: fp32, contiguous (None stays None)."""
    return [None if x is None else x.float().contiguous() for x in tensors]


def i2t_block_scores(
    kernels: Kernels,
    sims: torch.Tensor,
    scales: torch.Tensor | None,
    gram: torch.Tensor,
    norms: torch.Tensor,
    lambda_softmax: float,
    slope: float,
    eps: float,
) -> torch.Tensor:
    """Scores ``(I, T)`` of fp32 CPU similarities ``(T, L, I, K)`` (times ``scales`` ``(I, K)``
    where given), as :func:`hat.alignment._block_scores` computes them for image → text."""
    n_txt, n_words, n_img, n_reg = sims.shape
    sims, scales, gram, norms = _floats(sims, scales, gram, norms)
    out = torch.empty(n_txt, n_img)
    work = torch.empty(2 * n_words * n_reg + 2 * n_reg + n_words)
    kernels.block_scores(
        *map(_address, (sims, scales, gram, norms)),
        n_txt,
        n_words,
        n_img,
        n_reg,
        lambda_softmax,
        slope,
        eps,
        work.data_ptr(),
        out.data_ptr(),
    )
    return out.T


TILE_ROWS, TILE_DEPTH = 16, 64  # an AMX int8 tile: 16 rows of 64 one-byte values


def tiles_fit(regions: torch.Tensor) -> bool:
    """Whether int8 ``regions`` ``(I, K, D)`` cut into whole AMX tiles (K rows, D deep)."""
    _, n_reg, dim = regions.shape
    return n_reg % TILE_ROWS == 0 and dim % TILE_DEPTH == 0


def word_tiles(pieces: torch.Tensor) -> torch.Tensor:
    """int8 ``pieces`` ``(N, D)`` as i2t_tile_scores reads them: blocks of 16 pieces (zeros
    after the last), each D / 64 tiles whose row r holds, for each of the 16 pieces in turn,
    its values 4r .. 4r + 3 of that tile's 64 (four products a column, side by side)."""
    n, dim = pieces.shape
    blocks = -(-n // TILE_ROWS)
    padded = pieces.new_zeros(blocks * TILE_ROWS, dim)
    padded[:n] = pieces
    tiles = padded.view(blocks, TILE_ROWS, dim // TILE_DEPTH, TILE_DEPTH // 4, 4)
    return tiles.permute(0, 2, 3, 1, 4).contiguous()


def i2t_integer_scores(
    kernels: Kernels,
    regions: torch.Tensor | MappedRows,
    pieces: torch.Tensor,
    weights: torch.Tensor,
    scales: torch.Tensor | None,
    gram: torch.Tensor,
    norms: torch.Tensor,
    lambda_softmax: float,
    slope: float,
    eps: float,
) -> torch.Tensor:
    """Scores ``(I, 1)`` of one caption against int8 ``regions`` ``(I, K, D)`` from their
    integer products with its words' int8 ``pieces`` ``(L · P, D)`` of weights ``(L, P)``
    (``hat.alignment._IntegerWords``): in AMX tiles an image at a time, the counts never leaving
    the cache, where ``kernels.amx`` and the regions cut into tiles (:func:`tiles_fit`; then they
    may be rows read where they lie), else one int8 product (``_int_mm``) whose int32 counts the
    kernel folds. The same integers either way, so the same scores to the last bit."""
    n_img, n_reg, dim = regions.shape
    n_words, n_pieces = weights.shape
    weights, scales, gram, norms = _floats(weights, scales, gram, norms)
    out = torch.empty(n_img)
    work = torch.empty(2 * n_words * n_reg + 2 * n_reg + n_words)
    shared = (*map(_address, (scales, gram, norms)), n_words, n_img, n_reg)
    scoring = (lambda_softmax, slope, eps, work.data_ptr())
    if kernels.amx and tiles_fit(regions):
        if isinstance(regions, MappedRows):
            addresses = regions.addresses()
        else:
            regions = regions.contiguous()
            addresses = regions.data_ptr() + n_reg * dim * np.arange(n_img, dtype=np.uint64)
        tiles = word_tiles(pieces)
        scratch = torch.empty(n_reg, tiles.shape[0] * TILE_ROWS, dtype=torch.int32)
        kernels.tile_scores(
            addresses.ctypes.data,
            tiles.data_ptr(),
            tiles.shape[0],
            dim,
            weights.data_ptr(),
            n_pieces,
            *shared,
            *scoring,
            scratch.data_ptr(),
            out.data_ptr(),
        )
        return out[:, None]
    if isinstance(regions, MappedRows):
        regions = regions.gathered()
    counts = torch._int_mm(regions.reshape(-1, dim), pieces.T)  # vectors first: the faster order
    kernels.count_scores(
        counts.data_ptr(), weights.data_ptr(), n_pieces, *shared, *scoring, out.data_ptr()
    )
    return out[:, None]


BF16_ROWS, BF16_DEPTH = 16, 32  # an AMX bfloat16 tile: 16 rows of 32 values
BF16_PIECES = 3  # bfloat16 pieces of an fp32 value: 3 x 8 bits, fp32's 24


def bf16_fit(rows: int, dim: int) -> bool:
    """Whether ``rows`` regions of ``dim`` values cut into whole bfloat16 tiles."""
    return rows % BF16_ROWS == 0 and dim % BF16_DEPTH == 0


def bf16_pieces(kernels: Kernels, rows: torch.Tensor, vnni: bool) -> torch.Tensor:
    """fp32 ``rows`` ``(N, D)`` (``D % 32 == 0``) as three bfloat16 pieces each, x = hi + mid +
    lo, cut into AMX tiles as ``i2t_bf16_scores`` reads them: ``(3, N', D)`` int16, N rounded up
    to 16 with zero rows; ``vnni`` for regions (the tiles' second operand), else words."""
    n, dim = rows.shape
    whole = -(-n // BF16_ROWS) * BF16_ROWS
    (rows,) = _floats(rows)
    if whole != n:
        rows = torch.cat([rows, rows.new_zeros(whole - n, dim)])
    out = torch.empty(BF16_PIECES, whole, dim, dtype=torch.int16)
    kernels.bf16_tiles(rows.data_ptr(), whole, dim, int(vnni), out.data_ptr())
    return out


def i2t_bf16_scores(
    kernels: Kernels,
    regions: torch.Tensor,
    scales: torch.Tensor | None,
    norms: torch.Tensor,
    words: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    lambda_softmax: float,
    slope: float,
    eps: float,
) -> torch.Tensor:
    """Image → text scores ``(I, sum T)`` of fp32 ``regions`` ``(I, K, D)`` (times ``scales``
    ``(I, K)`` where given; ``norms`` ``(I, K)`` as scored) against blocks of captions, as
    :func:`i2t_block_scores` gives them, the region–word products taken in AMX bfloat16 tiles:
    ``words[c]`` block c's T · L words in :func:`bf16_pieces`, ``grams[c]`` ``(T, L, L)``.
    Six products of pieces (those down to 2⁻¹⁶ of the largest) sum to the fp32 product within
    fp32 rounding. Each image is cut into pieces once and its products with a block stay in
    cache while that block's captions are scored (:func:`bf16_fit` regions, ``kernels.amx``)."""
    n_img, n_reg, dim = regions.shape
    regions, scales, norms = _floats(regions, scales, norms)
    grams = _floats(*grams)
    sizes = torch.tensor([(w.shape[1], *g.shape[:2]) for w, g in zip(words, grams, strict=True)])
    widest = max(w.shape[1] for w in words)
    longest = max(g.shape[1] for g in grams)
    pointers = ctypes.c_void_p * len(words)
    out = torch.empty(int(sizes[:, 1].sum()), n_img)
    pieces = torch.empty(BF16_PIECES, n_reg, dim, dtype=torch.int16)
    work = torch.empty(widest * n_reg + 2 * longest * n_reg + 2 * n_reg + longest)
    kernels.bf16_scores(
        *map(_address, (regions, scales, norms)),
        n_img,
        n_reg,
        dim,
        len(words),
        ctypes.cast(pointers(*[w.data_ptr() for w in words]), ctypes.c_void_p),
        sizes.data_ptr(),
        ctypes.cast(pointers(*[g.data_ptr() for g in grams]), ctypes.c_void_p),
        lambda_softmax,
        slope,
        eps,
        pieces.data_ptr(),
        work.data_ptr(),
        out.data_ptr(),
    )
    return out.T


def t2i_block_scores(
    kernels: Kernels,
    sims: torch.Tensor,
    regions: torch.Tensor,
    scales: torch.Tensor | None,
    word_norms: torch.Tensor,
    real: torch.Tensor,
    lambda_softmax: float,
    slope: float,
    eps: float,
) -> torch.Tensor:
    """Scores ``(I, T)`` of fp32 CPU similarities ``(T, L, I, K)`` of ``regions`` ``(I, K, D)``
    (times ``scales`` ``(I, K)`` where given), as :func:`hat.alignment._block_scores` computes
    them for text → image; ``word_norms`` and ``real`` ``(T, L)``."""
    n_txt, n_words, n_img, n_reg = sims.shape
    dim = regions.shape[2]
    sims, regions, scales, word_norms, real = _floats(sims, regions, scales, word_norms, real)
    out = torch.empty(n_txt, n_img)
    work = torch.empty(2 * n_words * n_reg + n_reg + n_words)
    kernels.t2i_scores(
        *map(_address, (sims, regions, scales, word_norms, real)),
        n_txt,
        n_words,
        n_img,
        n_reg,
        dim,
        lambda_softmax,
        slope,
        eps,
        work.data_ptr(),
        out.data_ptr(),
    )
    return out.T


def i2t_ragged_scores(
    kernels: Kernels,
    regions: torch.Tensor,
    norms: torch.Tensor,
    words: torch.Tensor,
    lengths: torch.Tensor,
    lambda_softmax: float,
    slope: float,
    eps: float,
) -> torch.Tensor:
    """Scores ``(T,)`` of one image's fp32 regions ``(K, D)`` (norms ``(K,)``) against T
    captions whose real words ``(N, D)`` lie back to back, ``lengths`` ``(T,)`` of them each:
    one product of all words with the regions, then the kernel caption by caption."""
    words, regions, norms = _floats(words, regions, norms)
    sims = words @ regions.T  # (N, K): caption t's slab is its rows
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths.to(torch.int64), dim=0, out=offsets[1:])
    widest = int(lengths.max()) if len(lengths) else 0
    n_reg, dim = regions.shape
    out = torch.empty(len(lengths))
    work = torch.empty(widest * n_reg + 2 * n_reg + widest + widest * widest)
    kernels.ragged_scores(
        sims.data_ptr(),
        words.data_ptr(),
        offsets.data_ptr(),
        len(lengths),
        n_reg,
        dim,
        widest,
        norms.data_ptr(),
        lambda_softmax,
        slope,
        eps,
        work.data_ptr(),
        out.data_ptr(),
    )
    return out


def pq_coordinates(
    kernels: Kernels,
    codes: np.ndarray,
    centroids: np.ndarray,
    shift: torch.Tensor,
    own: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates ``(I, K, M · dsub (+ 1))`` of pq ``codes`` ``(I, K, M)`` and their norms
    ``(I, K)``: each code's centroid (``centroids`` ``(M, 256, dsub)``) plus the image's
    ``shift`` ``(I, M · dsub)``, then ``own`` ``(I,)`` where given
    (:meth:`hat.gallery.codecs.PQCodec.coordinates`)."""
    n_img, n_reg, subs = codes.shape
    dsub = centroids.shape[2]
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    shift, own = _floats(shift, own)
    out = torch.empty(n_img, n_reg, subs * dsub + (own is not None))
    norms = torch.empty(n_img, n_reg)
    kernels.pq_coordinates(
        codes.ctypes.data,
        n_img,
        n_reg,
        subs,
        dsub,
        centroids.ctypes.data,
        shift.data_ptr(),
        _address(own),
        out.data_ptr(),
        norms.data_ptr(),
    )
    return out, norms


# Lanes of i2t_pq_scores' table rows: a multiple of every vector width it is built for; it
# takes up to 8 vectors of them.
PQ_LANES = 16
PQ_MAX_WORDS = 64


def pq_lane_width(words: int) -> int:
    """Lanes of a table row of :func:`i2t_pq_scores` for ``words`` words."""
    return -(-words // PQ_LANES) * PQ_LANES


def i2t_pq_scores(
    kernels: Kernels,
    codes: torch.Tensor,
    shift: torch.Tensor,
    by_dimension: torch.Tensor,
    squares: torch.Tensor,
    lut: torch.Tensor,
    offsets: torch.Tensor,
    base: torch.Tensor,
    gram: torch.Tensor,
    lambda_softmax: float,
    slope: float,
    eps: float,
) -> torch.Tensor:
    """Image → text scores ``(I,)`` of pq ``codes`` ``(I, K, M)`` (regions: each image's
    ``shift`` ``(I, M · dsub)`` plus one centroid per code; the centroids by dimension
    ``(M, dsub, 256)`` and their squared norms ``(M, 256)``) against one caption of
    L ≤ :data:`PQ_MAX_WORDS` words (``gram`` ``(L, L)``), without decoding them: ``lut``
    ``(M, 256, W)`` holds each word's product with each centroid, ``offsets`` ``(I, W)`` with
    each image's shift and own row; ``base`` ``(I,)`` is the squared norm of the shift and own
    coordinate (:func:`hat.alignment.level_scores` builds them)."""
    n_img, n_reg, subs = codes.shape
    dsub, width, words = by_dimension.shape[1], lut.shape[2], gram.shape[0]
    if not (
        0 < words <= PQ_MAX_WORDS
        and width == pq_lane_width(words)
        and codes.dtype == torch.uint8
        and by_dimension.shape[::2] == (subs, 256)
    ):
        raise ValueError(
            f"pq scores take 1-{PQ_MAX_WORDS} words in tables of pq_lane_width(words) lanes and "
            f"one-byte codes of 256 centroids, not {words} words, {width} lanes, {codes.dtype} "
            f"codes, centroids {tuple(by_dimension.shape)}"
        )
    codes = codes.contiguous()
    lut, offsets, base, shift, gram = _floats(lut, offsets, base, shift, gram)
    by_dimension, squares = _floats(by_dimension, squares)
    out = torch.empty(n_img)
    work = torch.empty(256 * subs + 2 * words * n_reg + 3 * n_reg + words + width)
    kernels.pq_scores(
        codes.data_ptr(),
        n_img,
        n_reg,
        subs,
        dsub,
        lut.data_ptr(),
        width,
        offsets.data_ptr(),
        base.data_ptr(),
        by_dimension.data_ptr(),
        squares.data_ptr(),
        shift.data_ptr(),
        gram.data_ptr(),
        words,
        lambda_softmax,
        slope,
        eps,
        work.data_ptr(),
        out.data_ptr(),
    )
    return out


@lru_cache(maxsize=1)
def _xxh3() -> tuple[ctypes.CDLL, list[int]] | None:
    """The xxhash library's xxh3-64 streaming functions (the ``xxhash`` package's own build,
    which dispatches to the CPU's widest vectors), or None where they cannot be found."""
    try:
        library = ctypes.CDLL(xxhash._xxhash.__file__)
        functions = []
        for name in ("XXH3_64bits_reset", "XXH3_64bits_update", "XXH3_64bits_digest"):
            dispatched = getattr(library, f"{name}_dispatch", None)  # absent for reset/digest
            functions.append(ctypes.cast(dispatched or getattr(library, name), ctypes.c_void_p))
        library.XXH3_createState.restype = ctypes.c_void_p
        library.XXH3_freeState.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return library, [f.value for f in functions]


def hashes_rows() -> bool:
    """Whether :func:`gather_rows` can check rows (the kernels and xxhash's functions)."""
    return kernels() is not None and _xxh3() is not None


def gather_rows(
    kernels: Kernels,
    arrays: list[np.ndarray],
    starts: np.ndarray,
    counts: np.ndarray | None = None,
    digest: bool = False,
    in_place: Sequence[bool] = (),
) -> tuple[list[np.ndarray | None], np.ndarray | None]:
    """Rows of C-contiguous ``arrays`` (memory-mapped or not), back to back: row r is items
    ``starts[r] : starts[r] + counts[r]`` of each (one item where ``counts`` is None: an
    image's), as numpy's fancy indexing gathers them; with ``digest`` the xxh3-64 of each row,
    its arrays' parts in order (:func:`hat.gallery.storage.row_digests`; needs
    :func:`hashes_rows`). Arrays marked ``in_place`` are hashed where they lie, not copied
    (None in their place)."""
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    counts = np.ones_like(starts) if counts is None else np.ascontiguousarray(counts, np.int64)
    items = int(counts.sum())
    kept = list(in_place) + [False] * (len(arrays) - len(in_place))
    out = [
        None if keep else np.empty((items, *a.shape[1:]), dtype=a.dtype)
        for a, keep in zip(arrays, kept, strict=True)
    ]
    item_bytes = np.array([a.itemsize * int(np.prod(a.shape[1:])) for a in arrays], np.int64)
    pointers = ctypes.c_void_p * len(arrays)
    sources = pointers(*[a.ctypes.data for a in arrays])
    targets = pointers(*[None if o is None else o.ctypes.data for o in out])
    digests = np.empty(len(starts), dtype=np.uint64) if digest else None
    library, functions = _xxh3() if digest else (None, [None] * 3)
    state = library.XXH3_createState() if digest else None
    try:
        kernels.gather_rows(
            len(arrays),
            ctypes.cast(sources, ctypes.c_void_p),
            ctypes.cast(targets, ctypes.c_void_p),
            item_bytes.ctypes.data,
            starts.ctypes.data,
            counts.ctypes.data,
            len(starts),
            state,
            *functions,
            None if digests is None else digests.ctypes.data,
        )
    finally:
        if state:
            library.XXH3_freeState(state)
    return out, digests
