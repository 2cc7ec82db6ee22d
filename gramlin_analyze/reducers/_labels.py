"""Class labels as integer indices: the one-hot matrix's products without building it.

With ``Y`` the one-hot ``N x C`` matrix of the labels, ``Y^T H`` holds the
per-class sums of the rows of ``H``, ``Y^T 1`` the class counts and ``Y^T Y``
is diagonal (the counts). Summing rows by index costs ``O(N d)`` and memory
``C x d``; the one-hot product costs ``O(N C d)`` and ``N x C`` memory, which
for many classes is the larger term. For few classes the product is still the
faster: one BLAS call against a scatter-add (``docs/performance.md``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["class_index_np", "class_counts_np", "class_sums_np"]

#: Up to this many classes ``Y^T H`` is one product with the one-hot ``Y``, built
#: a block of rows at a time; above, rows are summed by index (``np.add.at``).
ONEHOT_MAX_CLASSES = 512
#: Rows of ``Y`` built at once (its memory: this many x C doubles).
ONEHOT_ROWS = 4096


def class_index_np(labels: npt.ArrayLike, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index, valid)``: labels as ``intp`` (0 where invalid) and which are valid.

    Valid labels are integers in ``[0, n_classes)`` (integral floats too);
    anything else (negative, too large, fractional, NaN) is invalid, and a
    result that depends on one is NaN rather than silently wrong.

    Examples
    --------
    >>> class_index_np([0, 2, 5], 3)
    (array([0, 2, 0]), array([ True,  True, False]))
    """
    lab = np.asarray(labels)
    if np.issubdtype(lab.dtype, np.integer):
        valid = (lab >= 0) & (lab < n_classes)
        return np.where(valid, lab, 0).astype(np.intp), valid
    labf = lab.astype(np.float64)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(labf) & (labf >= 0) & (labf < n_classes) & (labf == np.round(labf))
    return np.where(valid, labf, 0).astype(np.intp), valid


def _flat(index: np.ndarray, n_classes: int, lead: tuple[int, ...]) -> np.ndarray:
    """Indices into the ``(prod(lead) * C)`` rows of the batch entries' classes, flattened."""
    n = index.shape[-1]
    idx = np.broadcast_to(index, lead + (n,)).reshape(-1, n)
    offsets = np.arange(idx.shape[0], dtype=np.intp)[:, None] * n_classes
    return (idx + offsets).ravel()


def class_counts_np(index: np.ndarray, n_classes: int) -> np.ndarray:
    """Samples per class, ``(..., C)`` float64, for ``index`` of shape ``(..., n)``.

    Examples
    --------
    >>> class_counts_np(np.array([0, 2, 2]), 3)
    array([1., 0., 2.])
    """
    lead = index.shape[:-1]
    size = int(np.prod(lead, dtype=np.int64)) * n_classes
    counts = np.bincount(_flat(index, n_classes, lead), minlength=size)
    return counts.astype(np.float64).reshape(lead + (n_classes,))


def class_sums_np(h: np.ndarray, index: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class sums of the rows of ``h`` (..., n, d): ``Y^T H``, shape ``(..., C, d)``.

    Examples
    --------
    >>> class_sums_np(np.array([[1.0], [3.0], [5.0]]), np.array([0, 0, 1]), 2).ravel()
    array([4., 5.])
    """
    lead = np.broadcast_shapes(h.shape[:-2], index.shape[:-1])
    n, d = h.shape[-2:]
    if not lead and n_classes <= ONEHOT_MAX_CLASSES:
        return _onehot_sums(h, index, n_classes)
    out = np.zeros((int(np.prod(lead, dtype=np.int64)) * n_classes, d))
    rows = np.broadcast_to(h, lead + (n, d)).reshape(-1, d)
    np.add.at(out, _flat(index, n_classes, lead), rows)
    return out.reshape(lead + (n_classes, d))


def _onehot_sums(h: np.ndarray, index: np.ndarray, n_classes: int) -> np.ndarray:
    """``Y^T H`` for one ``(n, d)`` block as BLAS products with the one-hot ``Y``:
    about 20x faster than ``np.add.at`` for 10 classes and 1,024 x 512 rows."""
    n, d = h.shape
    out = np.zeros((n_classes, d))
    for start in range(0, n, ONEHOT_ROWS):
        idx = index[start : start + ONEHOT_ROWS]
        y = np.zeros((len(idx), n_classes))
        y[np.arange(len(idx)), idx] = 1.0
        out += y.T @ h[start : start + ONEHOT_ROWS]
    return out
