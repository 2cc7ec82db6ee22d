"""Float64 references of the paper's TL regression, shared by the tests that reproduce its code."""

import numpy as np


def regression_r2(H, Y):
    """``1 - RSS/TSS`` of least squares on unit-norm columns, singular values below
    ``sqrt(10 d eps)`` of the largest treated as zero (the pseudo-inverse MATH.md asks for:
    float32 features turn exact collinearities into singular values near 1e-9)."""
    norms = np.linalg.norm(H, axis=0)
    Hs = H / np.where(norms > 0, norms, 1.0)
    cutoff = np.sqrt(10 * H.shape[1] * np.finfo(np.float64).eps)
    B, *_ = np.linalg.lstsq(Hs, Y, rcond=cutoff)
    return 1 - np.sum((Y - Hs @ B) ** 2) / np.sum(Y**2)
