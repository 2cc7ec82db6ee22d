"""Dask inputs chunked along samples are reduced one chunk per task, then summed."""

from __future__ import annotations

import importlib

import xarray as xr
from reducer_helpers import close

import gramlin_analyze.reducers as R

vc_module = importlib.import_module("gramlin_analyze.reducers.vc")
tl_module = importlib.import_module("gramlin_analyze.reducers.target_linearity")


def test_kernels_see_one_sample_chunk_at_a_time(monkeypatch, rng):
    n, chunk = 60, 15
    h = xr.DataArray(rng.standard_normal((2, n, 5)), dims=("step", "sample", "in"))
    g = xr.DataArray(rng.standard_normal((2, n, 5)), dims=("step", "sample", "in"))
    labels = xr.DataArray(rng.integers(0, 3, n), dims="sample")
    ref_vc = R.virtual_covariance(h, g, 0.1).values
    ref_tl = R.target_linearity(h, labels=labels, n_classes=3).values
    seen: list[int] = []

    def spy(kernel):
        def wrapped(a, *rest):
            seen.append(a.shape[-2])
            return kernel(a, *rest)

        return wrapped

    monkeypatch.setattr(vc_module, "vc_stats_np", spy(vc_module.vc_stats_np))
    # labels: per-class sums by index (the one-hot path is for real-valued targets)
    monkeypatch.setattr(tl_module, "tl_label_stats_np", spy(tl_module.tl_label_stats_np))
    lazy_h, lazy_g = h.chunk(sample=chunk, step=1), g.chunk(sample=chunk, step=1)
    vc = R.virtual_covariance(lazy_h, lazy_g, 0.1)
    tl = R.target_linearity(lazy_h, labels=labels.chunk(sample=chunk), n_classes=3)
    assert not seen  # lazy until computed
    close(vc.compute(), ref_vc)
    close(tl.compute(), ref_tl)
    # 2 steps x 4 chunks per reduction; never a block holding more than one chunk
    assert max(seen) == chunk and len(seen) == 2 * 2 * (n // chunk)
