"""The Gram change's norms, one function for both phases of ``analyze``.

A new step's Gram change is computed in its own task when the previous Gram
is stored (an incremental run), otherwise along the chain in phase 2; both
call :func:`gram_norms` on the stored Grams, so the value does not depend on
where it was computed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gram_norms", "ratio"]


def ratio(num: float, den: float) -> float:
    """num / den, NaN when the denominator is 0 (two identical checkpoints)."""
    return float(num / den) if den > 0 else float("nan")


def gram_norms(G: np.ndarray, G_prev: np.ndarray | None, rows: int = 64) -> tuple[float, float]:
    """``(||G - G_prev||_F, ||G||_F)`` summed in float64 whatever the stored dtype.

    One pass over row blocks: float64 temporaries of a block, not of the
    whole matrix (fresh multi-MB buffers cost page faults on every call).
    ``||G - G_prev||_F`` is NaN without ``G_prev``.
    """
    sq_diff = sq = 0.0
    for r in range(0, G.shape[0], rows):
        g = np.asarray(G[r : r + rows], dtype=np.float64)
        sq += float(np.vdot(g, g))
        if G_prev is not None:
            d = np.subtract(g, G_prev[r : r + rows], dtype=np.float64)
            sq_diff += float(np.vdot(d, d))
    return (float(np.sqrt(sq_diff)) if G_prev is not None else float("nan")), float(np.sqrt(sq))
