"""A fused kernel for the image → text block score, built at first use with the system's C
compiler; where there is none, or it fails, scoring stays in PyTorch (:mod:`hat.alignment`).

After the similarity product, eager PyTorch makes about eight passes over a block's
(captions × words × images × regions) similarities: LeakyReLU, the norm over regions, the scale,
exp, the Gram-term product, two products with the attention and their sums over words. The
kernel makes them over one image's (words × regions) slab at a time, which stays in the core's
L1/L2 cache, and takes the Gram term ‖a_k‖² = e_k G e_kᵀ over half of the symmetric G. It is
plain C (no PyTorch headers), so it compiles in well under a second; the library is cached under
``$XDG_CACHE_HOME/hat/kernels`` by a hash of its source and flags, and called through ctypes,
which releases the GIL. Float sums run in another order than PyTorch's: scores agree to float
rounding (the tests: within 2e-6 of PyTorch's; a gallery's re-rank within 1e-5 of its decoded
features' scores, on every precision).

:mod:`hat.alignment` calls it at one PyTorch thread only (a server's model calls, as app.py
splits the cores; the speed targets): it runs on one thread, and with more PyTorch's own
elementwise steps run on all of them. ``HAT_NATIVE=0`` in the environment, or :func:`eager` in
code, keeps scoring in PyTorch.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from hat.fileio import cache_home

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

/* Image -> text scores of a block: sims (T, L, I, K) region-word products, scales (I, K) or
   NULL, gram (T, L, L) word Gram matrices, norms (I, K) region norms as scored; out (T, I);
   work: 2 L K + 2 K floats. Words whose Gram diagonal is 0 are zero vectors (padding): they
   add nothing to any sum, so they are skipped. */
void i2t_block_scores(const float *sims, const float *scales, const float *gram,
                      const float *norms, int64_t T, int64_t L, int64_t I, int64_t K,
                      float lam, float slope, float eps, float *work, float *out)
{
    float *x = work, *e = work + L * K, *dots = e + L * K, *sq = dots + K;
    for (int64_t t = 0; t < T; t++) {
        const float *g = gram + t * L * L;
        for (int64_t i = 0; i < I; i++) {
            const float *sc = scales ? scales + i * K : 0;
            for (int64_t l = 0; l < L; l++) {
                if (g[l * L + l] == 0.0f) continue;
                const float *s = sims + ((t * L + l) * I + i) * K;
                float *xl = x + l * K, *el = e + l * K, ss = 0.0f;
                for (int64_t k = 0; k < K; k++) {
                    float v = sc ? s[k] * sc[k] : s[k];
                    float y = v > 0.0f ? v : slope * v;
                    xl[k] = v;
                    ss += y * y;
                }
                float f = lam / (sqrtf(ss) + eps);
                for (int64_t k = 0; k < K; k++) {
                    float v = xl[k];
                    el[k] = expf((v > 0.0f ? v : slope * v) * f);
                }
            }
            int64_t k0 = 0;
            for (; k0 + BLOCK <= K; k0 += BLOCK) sums(e, x, g, L, K, k0, dots, sq);
            tail_sums(e, x, g, L, K, k0, K - k0, dots, sq);
            const float *n = norms + i * K;
            float total = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                float length = sqrtf(sq[k] > 0.0f ? sq[k] : 0.0f) * n[k];
                total += dots[k] / (length > eps ? length : eps);
            }
            out[t * I + i] = total / (float)K;
        }
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
_kernel: Callable | None = None
_tried = False
_enabled = True


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


def _load() -> Callable | None:
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found: image → text scoring stays in PyTorch")
        return None
    key = hashlib.sha256("\0".join([SOURCE, compiler, *_flags()]).encode()).hexdigest()[:16]
    target = cache_home() / "kernels" / f"i2t-{key}.so"
    try:
        if not target.is_file():
            _build(compiler, target)
        function = ctypes.CDLL(str(target)).i2t_block_scores
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning(
            "the fused scoring kernel could not be built (%s %s): scoring stays in PyTorch",
            exc,
            detail.decode(errors="replace")[-500:],
        )
        return None
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    function.argtypes = [pointer] * 4 + [size] * 4 + [real] * 3 + [pointer] * 2
    function.restype = None
    return function


def i2t_kernel() -> Callable | None:
    """The compiled kernel (built, or loaded from the cache, on the first call: a server calls
    this at start-up), or None where scoring stays in PyTorch."""
    global _kernel, _tried
    if not _enabled or os.environ.get(DISABLE) == "0":
        return None
    with _lock:
        if not _tried:
            _kernel, _tried = _load(), True
    return _kernel


@contextmanager
def eager() -> Iterator[None]:
    """Score in PyTorch inside this block (benchmarks compare both ways; tests check them)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def i2t_block_scores(
    kernel: Callable,
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
    tensors = [sims, scales, gram, norms]
    sims, scales, gram, norms = (None if x is None else x.float().contiguous() for x in tensors)
    out = torch.empty(n_txt, n_img)
    work = torch.empty(2 * n_words * n_reg + 2 * n_reg)
    kernel(
        sims.data_ptr(),
        None if scales is None else scales.data_ptr(),
        gram.data_ptr(),
        norms.data_ptr(),
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
