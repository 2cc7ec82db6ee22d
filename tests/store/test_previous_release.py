"""A store written by the previous release (0.2.0, kept in ``tests/data``) opens,
validates and takes new steps, on every supported zarr."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

import gramlin_analyze as ga
from gramlin_analyze.store.validate import validate_store
from tests.trajectory import write_trajectory

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "store-0.2.0.zarr"


def test_a_store_of_the_previous_release_opens_validates_and_grows(tmp_path):
    store = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, store)
    # It was made from write_trajectory(run, [0, 10, 20], formats=("safetensors",)).
    run = tmp_path / "run"
    expected = write_trajectory(run, [0, 10, 20, 30], formats=("safetensors",))
    assert validate_store(store) == []
    tree = ga.open(store)
    assert tree.attrs["creation_library_version"] == "0.2.0"
    for step in (0, 10, 20):
        np.testing.assert_array_equal(
            tree["layers/fc1"]["weight"].sel(step=step).values, expected[step]["fc1.weight"]
        )
    gram = tree["metrics/fc2"]["gram"].sel(step=10).values
    w = expected[10]["fc2.weight"].astype(np.float64)
    np.testing.assert_allclose(gram, w.T @ w, rtol=1e-6)

    assert ga.ingest(run, store).ingested == [30]
    assert ga.analyze(store, metrics=["gram", "spectrum"]).computed == 2 * 2
    assert validate_store(store) == []
    tree = ga.open(store)
    assert list(tree["steps"]["step"].values) == [0, 10, 20, 30]
    w = expected[30]["fc1.weight"].astype(np.float64)
    np.testing.assert_allclose(tree["metrics/fc1"]["gram"].sel(step=30).values, w.T @ w, rtol=1e-6)
    np.testing.assert_array_equal(
        tree["layers/fc2"]["weight"].sel(step=20).values, expected[20]["fc2.weight"]
    )
