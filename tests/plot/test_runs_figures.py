"""Comparison figures: what each line shows equals the runs' stored values (found by gid)."""

from __future__ import annotations

import numpy as np
import pytest

import gramlin_analyze as ga
import gramlin_analyze.plot as gp
from gramlin_analyze.errors import UsageError
from tests.runs.stores import SWEEP, derived_store, metrics_of

pytest.importorskip("matplotlib")

TL = "target_linearity"


def by_gid(fig, gid: str):
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, (gid, [a.get_gid() for ax in fig.axes for a in ax.get_children()])
    return found[0]


def last_tl(store) -> np.ndarray:
    """TL (layers 0, 2, 4) at the store's last step: every step of these stores is ok."""
    return metrics_of(store)[TL].isel(step=-1).sel(layer=["0", "2", "4"]).values


def test_one_line_per_run_with_its_own_steps(mlp_store, tmp_path):
    a = derived_store(mlp_store, tmp_path / "a.zarr", run_name="a", steps=[0, 8])
    b = derived_store(mlp_store, tmp_path / "b.zarr", run_name="b", steps=[3, 8], scale=0.5)
    fig = gp.runs_tl_over_steps([a, b])
    for store, name in ((a, "a"), (b, "b")):
        own = metrics_of(store)[TL]
        for layer in ("0", "2", "4"):
            line = by_gid(fig, f"{TL}|{layer}|{name}")
            np.testing.assert_array_equal(line.get_xdata(), own["step"].values)
            np.testing.assert_array_equal(line.get_ydata(), own.sel(layer=layer).values)


def test_seeds_are_pooled_into_mean_and_spread(noise_sweep):
    fig = gp.runs_tl_over_steps(ga.open_runs(noise_sweep))
    for noise in (0.0, 0.5):
        members = [
            metrics_of(s)[TL] for s, (p, _, _) in zip(noise_sweep, SWEEP, strict=True) if p == noise
        ]
        stacked = np.stack([m.sel(layer="4").values for m in members])
        line = by_gid(fig, f"{TL}|4|label_noise={noise}|mean")
        np.testing.assert_allclose(line.get_ydata(), stacked.mean(0), rtol=1e-12)
        band = by_gid(fig, f"{TL}|4|label_noise={noise}|spread")
        assert band is not None  # the shaded min-max of the seeds


def test_final_tl_against_an_attribute(noise_sweep):
    tree = ga.open_runs(noise_sweep)
    fig = gp.final_tl_by(tree, "label_noise", layers=["4"])
    line = by_gid(fig, f"{TL}|4|by=label_noise")
    finals = {p: [] for p, _, _ in SWEEP}
    for store, (p, _, _) in zip(noise_sweep, SWEEP, strict=True):
        finals[p].append(last_tl(store)[2])
    np.testing.assert_array_equal(line.get_xdata(), [0.0, 0.5])
    np.testing.assert_allclose(line.get_ydata(), [np.mean(finals[p]) for p in (0.0, 0.5)])
    points = by_gid(fig, f"{TL}|4|by=label_noise|runs").get_offsets()
    assert len(points) == 4


def test_tl_gap_between_two_layers(noise_sweep):
    fig = gp.tl_gap_by(noise_sweep, "label_noise", layers=["0", "4"])
    line = by_gid(fig, "tl_gap|0|4|by=label_noise")
    gaps = {p: [] for p, _, _ in SWEEP}
    for store, (p, _, _) in zip(noise_sweep, SWEEP, strict=True):
        tl = last_tl(store)
        gaps[p].append(tl[2] - tl[0])
    np.testing.assert_allclose(line.get_ydata(), [np.mean(gaps[p]) for p in (0.0, 0.5)])
    with pytest.raises(UsageError, match="no run attribute 'lr'"):
        gp.final_tl_by(noise_sweep, "lr")
