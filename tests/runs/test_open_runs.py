"""``ga.open_runs``: several stores as one lazy DataTree along ``run``, checked value by
value against each store's own ``/metrics``."""

from __future__ import annotations

import shutil

import dask.array
import numpy as np
import pytest
import xarray as xr

import gramlin_analyze as ga
from gramlin_analyze.errors import MissingDataError, UsageError
from tests.runs.stores import SWEEP, derived_store, metrics_of


def assert_aligned(runs: xr.Dataset, stores, names) -> None:
    """Every variable of every run equals its store's value at the same (step, layer),
    and is NaN at the joined steps and layers the store lacks."""
    for store, name in zip(stores, names, strict=True):
        own = metrics_of(store)
        got = runs.sel(run=name)
        for var in own.data_vars:
            if set(own[var].dims) != {"step", "layer"}:
                continue
            expected = own[var].reindex(step=runs["step"], layer=runs["layer"])
            np.testing.assert_array_equal(
                got[var].transpose("step", "layer").values,
                expected.transpose("step", "layer").values,
                err_msg=f"{name} {var}",
            )


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Two real runs, ingested and analyzed: seeds 0 and 1, at steps 0-2 and 1-3."""
    from tests.trajectory import write_trajectory

    base = tmp_path_factory.mktemp("seeds")
    stores = []
    for seed, steps in ((0, [0, 1, 2]), (1, [1, 2, 3])):
        write_trajectory(base / f"seed{seed}", steps, seed=seed)
        store = base / f"s{seed}.zarr"
        assert not ga.ingest(base / f"seed{seed}", store).failed
        ga.analyze(store)
        stores.append(store)
    return stores


def test_real_runs_join_outer_on_steps(two_seeds):
    tree = ga.open_runs(two_seeds)
    ds = tree["metrics"].to_dataset()
    assert list(ds["run"].values) == ["seed0", "seed1"]  # each store's run_name
    assert list(ds["step"].values) == [0, 1, 2, 3]
    assert list(ds["store"].values) == [str(s) for s in two_seeds]
    np.testing.assert_array_equal(ds["ok"].values, [[1, 1, 1, 0], [0, 1, 1, 1]])
    assert ds["effective_rank"].dims == ("run", "step", "layer")
    assert np.isnan(ds["effective_rank"].sel(run="seed0", step=3)).all()
    assert_aligned(ds, two_seeds, ["seed0", "seed1"])
    manifest = tree["steps"].to_dataset()
    assert manifest["status"].sel(run="seed1").values.tolist() == ["", "ok", "ok", "ok"]


def test_values_stay_lazy_until_computed(mlp_store, tmp_path):
    """Opening reads no metric values: they are Dask arrays; and /layers is never needed."""
    store = tmp_path / "bare.zarr"
    shutil.copytree(mlp_store, store)
    shutil.rmtree(store / "layers")
    shutil.rmtree(store / "probe")
    tree = ga.open_runs([store, mlp_store])
    tl = tree["metrics"]["target_linearity"]
    assert isinstance(tl.data, dask.array.Array)
    np.testing.assert_array_equal(
        tl.values[0], tl.values[1]
    )  # the same run twice: names disambiguated, values equal
    assert len(set(tree["metrics"]["run"].values.tolist())) == 2


def test_run_attributes_are_coordinates(noise_sweep):
    ds = ga.open_runs(noise_sweep)["metrics"].to_dataset()
    assert ds["label_noise"].values.tolist() == [p for p, _, _ in SWEEP]
    assert ds["seed"].dtype == np.int64 and ds["optimizer"].values.tolist() == ["sgd"] * 4
    noisy = ds.sel(run=ds.label_noise == 0.5)
    assert noisy["run"].values.tolist() == ["p0.5-s0", "p0.5-s1"]
    means = ds["target_linearity"].groupby("label_noise").mean("run")
    for noise in (0.0, 0.5):
        members = [
            metrics_of(s) for s, (p, _, _) in zip(noise_sweep, SWEEP, strict=True) if p == noise
        ]
        reference = sum(m["target_linearity"].values for m in members) / len(members)
        np.testing.assert_allclose(
            means.sel(label_noise=noise).transpose("step", "layer").values,
            reference,
            rtol=1e-12,
        )
    assert_aligned(ds, noise_sweep, ds["run"].values.tolist())


def test_glob_and_duplicate_names(mlp_store, tmp_path):
    for name in ("b", "a"):
        derived_store(mlp_store, tmp_path / f"{name}.zarr", run_name="same")
    ds = ga.open_runs(str(tmp_path / "*.zarr"))["metrics"]
    assert ds["run"].values.tolist() == ["same@a", "same@b"]  # sorted paths, unique names
    assert ds["store"].values.tolist() == [str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")]
    with pytest.raises(UsageError, match="no store matches"):
        ga.open_runs(str(tmp_path / "nothing*.zarr"))


def test_not_ok_steps_are_masked_not_dropped(mlp_store, tmp_path):
    a = derived_store(mlp_store, tmp_path / "a.zarr", run_name="a", status={3: "failed"})
    b = derived_store(mlp_store, tmp_path / "b.zarr", run_name="b", steps=[3, 8], scale=2.0)
    ds = ga.open_runs([a, b])["metrics"]
    np.testing.assert_array_equal(ds["ok"].values, [[1, 0, 1], [0, 1, 1]])
    assert_aligned(ds.to_dataset(), [a, b], ["a", "b"])  # stored values kept; ok says which


def test_align_by_epoch(mlp_store, tmp_path):
    a = derived_store(mlp_store, tmp_path / "a.zarr", run_name="a", epochs=[0.0, 1.0, 2.0])
    b = derived_store(
        mlp_store, tmp_path / "b.zarr", run_name="b", steps=[0, 8], epochs=[0.0, 1.5], scale=0.5
    )
    ds = ga.open_runs([a, b], align="epoch")["metrics"].to_dataset()
    assert ds["epoch"].values.tolist() == [0.0, 1.0, 1.5, 2.0]
    np.testing.assert_array_equal(ds["step"].sel(run="b").values, [0, np.nan, 8, np.nan])
    own = metrics_of(b)["target_linearity"]
    np.testing.assert_array_equal(
        ds["target_linearity"].sel(run="b", epoch=1.5).values, own.sel(step=8).values
    )
    assert np.isnan(ds["target_linearity"].sel(run="b", epoch=1.0)).all()
    with pytest.raises(UsageError, match="cannot align by epoch"):
        ga.open_runs([a, mlp_store], align="epoch")  # the MLP store records no epochs


def test_align_by_tokens_seen(mlp_store, tmp_path):
    a = derived_store(mlp_store, tmp_path / "a.zarr", run_name="a", tokens=[0, 512, 1024])
    b = derived_store(
        mlp_store, tmp_path / "b.zarr", run_name="b", steps=[0, 8], tokens=[0, 768], scale=3.0
    )
    ds = ga.open_runs([a, b], align="tokens")["metrics"].to_dataset()
    assert ds["tokens_seen"].values.tolist() == [0.0, 512.0, 768.0, 1024.0]
    np.testing.assert_array_equal(ds["step"].sel(run="b").values, [0, np.nan, 8, np.nan])
    own = metrics_of(b)["target_linearity"]
    np.testing.assert_array_equal(
        ds["target_linearity"].sel(run="b", tokens_seen=768.0).values, own.sel(step=8).values
    )
    with pytest.raises(UsageError, match="cannot align by tokens_seen"):
        ga.open_runs([a, mlp_store], align="tokens")  # the MLP store counts no tokens


def test_errors_name_the_store(tmp_path, mlp_store):
    with pytest.raises(UsageError, match="align must be"):
        ga.open_runs([mlp_store], align="time")
    from tests.trajectory import write_trajectory

    write_trajectory(tmp_path / "run", [0])
    ga.ingest(tmp_path / "run", tmp_path / "w.zarr")
    with pytest.raises(MissingDataError, match="run gramlin-analyze analyze"):
        ga.open_runs([mlp_store, tmp_path / "w.zarr"])
    with pytest.raises(OSError, match="not a gramlin-analyze store|no store there"):
        ga.open_runs([mlp_store, tmp_path])


def test_stores_on_s3_by_glob(s3_server, noise_sweep, tmp_path):
    """A glob of s3:// URLs opens the same runs as the local stores, through fsspec."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    prefix = f"{s3_server.bucket}/open-runs"
    for store in noise_sweep[:2]:
        fs.put(str(store), f"{prefix}/{store.name}", recursive=True)
    tree = ga.open_runs(f"s3://{prefix}/run*.zarr", storage_options=s3_server.storage_options)
    ds = tree["metrics"].to_dataset()
    assert ds["store"].values.tolist() == [f"s3://{prefix}/run0.zarr", f"s3://{prefix}/run1.zarr"]
    assert ds["label_noise"].values.tolist() == [0.0, 0.0]
    local = ga.open_runs(noise_sweep[:2])["metrics"].to_dataset()
    xr.testing.assert_equal(ds.drop_vars("store").load(), local.drop_vars("store").load())


def test_run_names_are_unique():
    from gramlin_analyze.runs import run_names

    attrs = [{"run_name": "a"}, {"run_name": "a"}, {}, {"run_name": "b"}, {"run_name": "b"}]
    urls = ["x/p.zarr", "y/q.zarr", "z/r.zarr", "u/s.zarr", "v/s.zarr"]
    assert run_names(attrs, urls) == ["a@p", "a@q", "r", "b@s", "b@s-2"]
