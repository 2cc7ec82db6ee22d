"""The random-label example, reduced: two noise levels, few steps, real training, ingest and analyze."""

from __future__ import annotations

import numpy as np
import xarray as xr

import gramlin_analyze as ga
from examples.digits.train import randomize_labels
from examples.random_labels.experiment import run_experiment


def _tl_reference(store) -> float:
    """TL of the head's input at the last step, in float64 NumPy from the stored arrays:
    ``1 - ||Y_c - H B||^2 / ||Y_c||^2`` with ``B`` the least-squares solution (MATH.md)."""
    h = xr.open_dataset(str(store), engine="zarr", group="layers/head")["input"]
    h = h.isel(step=-1).values.astype(np.float64)
    labels = xr.open_dataset(str(store), engine="zarr", group="probe")["labels"].values
    y = np.eye(10)[labels.astype(int)]
    yc = y - y.mean(0)
    b = np.linalg.lstsq(h, yc, rcond=None)[0]
    return 1 - np.sum((yc - h @ b) ** 2) / np.sum(yc**2)


def test_randomize_labels_replaces_the_fraction_asked():
    labels = np.random.default_rng(5).integers(0, 10, size=1000)
    for p in (0.0, 0.25, 1.0):
        noisy = randomize_labels(labels, p, seed=3)
        chosen = round(p * labels.size)
        # a replaced label keeps its class with probability 1/10
        changed = int((noisy != labels).sum())
        assert changed <= chosen and (chosen == 0 or changed > 0.8 * chosen)
        np.testing.assert_array_equal(noisy, randomize_labels(labels, p, seed=3))


def test_reduced_experiment_shows_the_trend(tmp_path):
    res = run_experiment(tmp_path / "rl", noise=(0.0, 1.0), steps=120, every=60, report=False)
    assert res["tl"][0.0] > res["tl"][1.0] + 0.2
    runs = ga.open_runs(res["stores"])
    ds = runs["metrics"].to_dataset()
    assert ds["target_linearity"].dims == ("run", "step", "layer")
    assert ds["label_noise"].dims == ("run",) and ds["label_noise"].values.tolist() == [0.0, 1.0]
    assert ds["step"].values.tolist() == [0, 60, 120]
    # against each store's own /metrics, read by xarray alone
    for store, p in zip(res["stores"], (0.0, 1.0), strict=True):
        own = xr.open_dataset(str(store), engine="zarr", group="metrics")
        np.testing.assert_array_equal(
            ds["target_linearity"].sel(run=ds.label_noise == p).squeeze("run").sel(layer="head"),
            own["target_linearity"].sel(layer="head").values,
        )
        assert res["tl"][p] == float(own["target_linearity"].sel(layer="head").values[-1])
        np.testing.assert_allclose(res["tl"][p], _tl_reference(store), rtol=1e-5)
    assert "| 0 |" in res["table"] and "about 0.45" in res["table"]
