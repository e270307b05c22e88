"""Blocked float32 Cholesky and triangular inverse, in place, for GPTQ's H^-1 factor on wide layers.

numpy.linalg computes in float64 whatever its input (a float32 matrix is copied up, solved, copied down), and its
`inv` allocates an identity and a working copy: for an 8,960-wide layer input (qwen2.5-coder-1.5b's MLP down
projection) that is about 2.5 GB of transient memory for one 321 MB matrix. These routines keep one float32
matrix and block-sized temporaries: numpy.linalg runs only on BLOCK x BLOCK diagonal blocks, everything else is
matrix products in float32, which is what GPTQ's reference implementation computes in.
"""

from __future__ import annotations

import numpy as np

BLOCK = 256
SMALL_BLOCK = 128  # diagonal blocks for matrices up to SMALL_WIDTH wide
SMALL_WIDTH = 2048
# Rows of the trailing update per product (temporaries of ROWS x n): each product also fills the part of its
# diagonal square above the diagonal, wasted work that shrinks with the slab (1,024 -> 256 rows, and 128-wide
# diagonal blocks up to 2,048: a 2,048-wide factor and inverse 0.10 -> 0.074 s here; 256-wide blocks stay better
# from 4,096 up)
ROWS = 256


def cholesky_lower_(a: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Overwrite the symmetric positive definite float32 `a` with its lower Cholesky factor L (a = L L^T; the
    upper triangle is zeroed). Raises numpy.linalg.LinAlgError where a diagonal block is not positive definite."""
    n = len(a)
    for j in range(0, n, block):
        e = min(j + block, n)
        lower = np.linalg.cholesky(a[j:e, j:e]).astype(a.dtype)
        a[j:e, j:e] = lower
        if e == n:
            break
        panel = a[e:, j:e]
        panel[...] = panel @ np.linalg.inv(lower).T.astype(a.dtype)  # L21 = A21 L11^-T
        for r in range(e, n, ROWS):  # A22 -= L21 L21^T, lower triangle only, a slab of rows at a time
            stop = min(r + ROWS, n)
            a[r:stop, e:stop] -= panel[r - e : stop - e] @ panel[: stop - e].T
    _zero_upper(a, block)
    return a


def invert_lower_(lower: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Overwrite the lower-triangular `lower` with its inverse (also lower triangular), block row by block row:
    X[i, :i] = -X_ii L[i, :i] X[:i, :i] reads only rows already inverted and the row block being replaced."""
    n = len(lower)
    for i in range(0, n, block):
        e = min(i + block, n)
        diagonal = np.linalg.inv(lower[i:e, i:e]).astype(lower.dtype)
        if i:
            lower[i:e, :i] = -diagonal @ (lower[i:e, :i] @ lower[:i, :i])
        lower[i:e, i:e] = np.tril(diagonal)
    return lower


def inverse_cholesky_upper(flipped: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U (GPTQ's factor), given `flipped` = J H J (H with the order of its rows
    and columns reversed, a private float32 copy, consumed). With J H J = L L^T, H^-1 = (J L^-T J)(J L^-1 J), so
    U = J L^-1 J: one Cholesky and one triangular inverse in place, and U is a reversed view of that buffer."""
    block = SMALL_BLOCK if len(flipped) <= SMALL_WIDTH else BLOCK
    return invert_lower_(cholesky_lower_(flipped, block), block)[::-1, ::-1]


def _zero_upper(a: np.ndarray, block: int) -> None:
    for i in range(0, len(a), block):
        e = min(i + block, len(a))
        a[i:e, e:] = 0
        a[i:e, i:e] = np.tril(a[i:e, i:e])
