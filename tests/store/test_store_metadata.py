"""The store's metadata shortcuts agree with zarr's own paths: growing arrays by
writing their ``zarr.json`` directly, lookups in consolidated metadata without
zarr's event loop, the driver's view shared with task threads; and manifest
rows leave ``ok`` before their new fields are written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from gramlin_analyze.store import (
    GramlinStore,
    open_for_tasks,
    read_all,
    resize_all,
    share_with_tasks,
    write_all,
)


def _make(path, name, shape, chunks, dtype="float32", **kw):
    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    arr = root.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        dimension_names=["step", "i"],
        fill_value=np.nan,
        **kw,
    )
    data = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    arr[:] = data
    return arr, data


@pytest.mark.parametrize("compressed", [False, True])
def test_growing_writes_the_metadata_zarr_writes(tmp_path, compressed):
    kw = {} if compressed else {"compressors": None}
    ours, data = _make(
        tmp_path / "a.zarr", "x", (5, 3), (1, 3), attributes={"long_name": "x"}, **kw
    )
    theirs, _ = _make(tmp_path / "b.zarr", "x", (5, 3), (1, 3), attributes={"long_name": "x"}, **kw)
    resize_all([(ours, (7, 3))])
    theirs.resize((7, 3))
    assert ours.shape == (7, 3)  # the handle is updated in place, as zarr's resize does
    a = json.loads((tmp_path / "a.zarr" / "x" / "zarr.json").read_text())
    b = json.loads((tmp_path / "b.zarr" / "x" / "zarr.json").read_text())
    assert a == b and a["shape"] == [7, 3]
    again = zarr.open_array(str(tmp_path / "a.zarr"), path="x", mode="r")
    np.testing.assert_array_equal(again[:5], data)
    assert np.isnan(again[5:]).all()  # new rows read as the fill value
    assert not list((tmp_path / "a.zarr" / "x").glob("*.partial"))


def test_shrinking_goes_through_zarr_and_deletes_the_rows(tmp_path):
    arr, data = _make(tmp_path / "a.zarr", "x", (5, 3), (1, 3))
    resize_all([(arr, (3, 3))])
    assert sorted(_chunk_files(tmp_path / "a.zarr" / "x")) == ["c/0/0", "c/1/0", "c/2/0"]
    resize_all([(arr, (5, 3))])
    again = zarr.open_array(str(tmp_path / "a.zarr"), path="x", mode="r")
    np.testing.assert_array_equal(again[:3], data[:3])
    assert np.isnan(again[3:]).all()


MANIFEST_LIKE = [
    ("str", "", np.array(["ok", "pending", "", "failed", "x" * 300, "é"], dtype=object)),
    ("int64", -1, np.arange(6, dtype=np.int64) * 7 - 3),
    ("float64", np.nan, np.array([0.1, np.nan, 3, -2, 1e300, -0.0])),
    ("float64", np.nan, np.full(6, np.nan)),  # all fill value: no chunk file, as zarr does
    ("bool", False, np.array([True, False, True, True, False, False])),
    ("float64", 0.0, np.array([-0.0, 0.0, 0.0, 0.0, 0.0, 0.0])),  # -0.0 is not the fill value 0.0
]


def _chunk_files(root):
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != "zarr.json"
    }


@pytest.mark.parametrize("chunks", [(512,), (4,)])
@pytest.mark.parametrize("case", range(len(MANIFEST_LIKE)))
def test_small_arrays_are_written_and_read_as_zarr_does(tmp_path, case, chunks):
    """The manifest, coordinates and scalar arrays go through zarr's own codecs
    in the calling thread: the same chunk files as zarr writes, the same values
    back, for whole and partial edge chunks."""
    dtype, fill, values = MANIFEST_LIKE[case]
    dtype = str if dtype == "str" else dtype
    arrays = []
    for name in ("ours", "theirs"):
        root = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        arrays.append(
            root.create_array("c", shape=(6,), chunks=chunks, dtype=dtype, fill_value=fill)
        )
    ours, theirs = arrays
    write_all([(ours, values)])
    theirs[:] = values
    assert _chunk_files(tmp_path / "ours.zarr") == _chunk_files(tmp_path / "theirs.zarr")
    (got,) = read_all([theirs])
    expected = theirs[:]
    assert got.dtype == expected.dtype
    if dtype is str:
        assert list(got) == list(expected) == list(values)
    else:
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got, values)
    if dtype == "float64" and fill == 0.0:
        assert np.signbit(got[0])
    # a second write replaces the first, including chunks that become all fill value
    write_all([(ours, np.full(6, fill, dtype=object if dtype is str else dtype))])
    assert _chunk_files(tmp_path / "ours.zarr") == {}


def test_two_dimensional_scalar_arrays(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((7, 3))
    values[2, 1] = np.nan
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    a = root.create_array("m", shape=(7, 3), chunks=(4, 3), dtype="float64", fill_value=np.nan)
    b = root.create_array("n", shape=(7, 3), chunks=(4, 3), dtype="float64", fill_value=np.nan)
    write_all([(a, values)])
    b[:] = values
    assert _chunk_files(tmp_path / "s.zarr" / "m") == _chunk_files(tmp_path / "s.zarr" / "n")
    np.testing.assert_array_equal(read_all([a])[0], values)


def test_tasks_share_the_drivers_view(tmp_path):
    import gramlin_analyze as ga
    from tests.trajectory import write_trajectory

    run, store = tmp_path / "run", tmp_path / "s.zarr"
    write_trajectory(run, [0, 10])
    ga.ingest(run, store)
    gs = GramlinStore(store, mode="a")
    share_with_tasks(str(store), "run-1", gs.view)
    assert open_for_tasks(str(store), None, "run-1") is gs.view
    other = open_for_tasks(str(store), None, "run-2")  # another run opens its own
    assert (
        other is not gs.view
        and other["layers/fc1/weight"].shape == gs.view["layers/fc1/weight"].shape
    )


def test_a_row_leaves_ok_before_its_new_fields_are_written(tmp_path, monkeypatch):
    """Re-ingesting a changed checkpoint rewrites its fingerprint and marks it
    pending. Killed between the two writes, the row must not be ok with the new
    fingerprint (the next ingest would trust the old data)."""
    import gramlin_analyze as ga
    import gramlin_analyze.store.core as core
    from tests.trajectory import write_trajectory

    run, store = tmp_path / "run", tmp_path / "s.zarr"
    write_trajectory(run, [0, 10])
    ga.ingest(run, store)
    gs = GramlinStore(store, mode="a")

    real = core.write_all
    calls: list[list[str]] = []

    def killed(pairs):
        calls.append([a.path.rsplit("/", 1)[-1] for a, _ in pairs])
        if "fingerprint" in calls[-1]:
            raise KeyboardInterrupt("killed while writing the other columns")
        real(pairs)

    with gs.lock():
        monkeypatch.setattr(core, "write_all", killed)
        with pytest.raises(KeyboardInterrupt):
            gs.write_rows([1], fingerprint="new", status="pending")
        monkeypatch.undo()
    assert calls == [["status"], ["fingerprint"]]
    man = GramlinStore(store).manifest()
    assert list(man["status"]) == ["ok", "pending"]
    assert man["fingerprint"][1] != "new"


def test_kernel_threads_limits_blas_and_restores_it():
    from threadpoolctl import threadpool_info

    from gramlin_analyze.scheduling import kernel_threads

    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    assert before
    with kernel_threads(1):
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before


def test_a_writer_killed_while_appending_a_step_leaves_a_store_the_next_one_repairs(
    tmp_path, monkeypatch
):
    """The append batch grows and rewrites every array at once; killed midway,
    manifest columns and arrays have different lengths. The next ingest must
    take the step coordinate's length, repair the shapes and ingest the step,
    giving the store a single ingest gives."""
    import xarray as xr

    import gramlin_analyze as ga
    from tests.trajectory import write_trajectory

    run, store, fresh = tmp_path / "run", tmp_path / "s.zarr", tmp_path / "f.zarr"
    write_trajectory(run, [0, 10, 20])
    ga.ingest(run, store)
    ga.analyze(store, metrics=["gram"])
    write_trajectory(run, [30], seed=3)
    real = zarr.AsyncArray.resize

    class Killed(Exception):
        pass

    async def killed(self, shape, *args, **kw):
        if self.path in ("steps/status", "layers/fc2/weight"):
            raise Killed("killed while growing")
        return await real(self, shape, *args, **kw)

    monkeypatch.setattr(zarr.AsyncArray, "resize", killed)
    with pytest.raises(Killed):
        ga.ingest(run, store)
    monkeypatch.undo()
    live = zarr.open_group(str(store), mode="r", zarr_format=3, use_consolidated=False)
    assert live["steps/status"].shape == (3,) and live["layers/fc2/weight"].shape[0] == 3
    lengths = {
        a.shape[0] for _, a in live.members(max_depth=None) if isinstance(a, zarr.Array) and a.ndim
    }
    assert {3, 4} <= lengths  # killed midway: arrays of both lengths
    assert ga.ingest(run, store).ingested == [30]
    assert ga.analyze(store, metrics=["gram"]).computed == 2
    ga.ingest(run, fresh)
    ga.analyze(fresh, metrics=["gram"])
    a, b = ga.open(store), ga.open(fresh)
    for path in ("layers/fc1", "layers/fc2", "metrics/fc1", "metrics/fc2"):
        xr.testing.assert_equal(a[path].to_dataset(), b[path].to_dataset())
    assert list(a["steps"].to_dataset()["status"].values) == ["ok"] * 4


def test_a_command_leaves_zarrs_configuration_alone(tmp_path):
    """No process-wide setting of zarr's changes under a user's notebook."""
    import gramlin_analyze as ga
    from tests.trajectory import write_trajectory

    before = dict(
        zarr.config.get("json_indent") and {"json_indent": zarr.config.get("json_indent")} or {}
    )
    snapshot = zarr.config.config.copy() if hasattr(zarr.config, "config") else None
    write_trajectory(tmp_path / "run", [0, 10])
    ga.ingest(tmp_path / "run", tmp_path / "s.zarr")
    ga.analyze(tmp_path / "s.zarr", metrics=["gram"])
    assert (
        dict(
            zarr.config.get("json_indent") and {"json_indent": zarr.config.get("json_indent")} or {}
        )
        == before
    )
    if snapshot is not None:
        assert zarr.config.config == snapshot
    doc = (tmp_path / "s.zarr" / "steps" / "status" / "zarr.json").read_text()
    assert doc.startswith("{\n"), "documents keep zarr's own (indented) format"


def _files(root) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _node_specs(rng):
    """Groups and arrays as the store declares them: attributes, dimension names,
    NaN and integer fill values, data (compressed and not), the step chunk key encoding."""
    groups = [("g", {"description": "a group", "n": 3}), ("g/sub", {"long_name": "nested"})]
    arrays = [
        (
            "g/empty",
            dict(
                shape=(0, 4),
                dtype="float32",
                chunks=(1, 4),
                fill_value=np.nan,
                compressors=None,
                dimension_names=["step", "out"],
                chunk_key_encoding={"name": "default", "separator": "/"},
            ),
        ),
        (
            "g/sub/weights",
            dict(
                shape=(3, 5, 6),
                dtype="float64",
                chunks=(1, 5, 6),
                fill_value=np.nan,
                compressors=None,
                dimension_names=["step", "out", "in"],
                attributes={"long_name": "w", "units": "1"},
            ),
        ),
        (
            "g/count",
            dict(shape=(7,), dtype="int64", chunks=(4,), fill_value=-1, dimension_names=["step"]),
        ),
        (
            "g/inputs",
            dict(
                data=rng.standard_normal((9, 2, 3)).astype(np.float32),
                chunks=(4, 2, 3),
                dimension_names=["sample", "a", "b"],
                attributes={"long_name": "probe inputs"},
            ),
        ),
        (
            "g/sample",
            dict(data=np.arange(9, dtype=np.int64), chunks=(9,), dimension_names=["sample"]),
        ),
    ]
    return groups, arrays


def test_creating_nodes_writes_the_files_zarr_writes(tmp_path):
    """A new local store's groups and arrays are made in memory by zarr and written
    here: the same documents and chunk files, byte for byte, as zarr creating them."""
    from zarr.api import synchronous as zs

    from gramlin_analyze.store import create_nodes

    rng = np.random.default_rng(11)
    groups, arrays = _node_specs(rng)
    # The root has attributes: creating its children must leave its document alone.
    ours = zarr.open_group(
        str(tmp_path / "ours.zarr"), mode="w", zarr_format=3, attributes={"root": 1}
    )
    theirs = zarr.open_group(
        str(tmp_path / "theirs.zarr"), mode="w", zarr_format=3, attributes={"root": 1}
    )
    create_nodes(ours.store, groups=groups, arrays=arrays)
    for path, attrs in groups:
        zs.create_group(store=theirs.store, path=path, zarr_format=3, attributes=attrs)
    for path, kw in arrays:
        zs.create_array(theirs.store, name=path, zarr_format=3, **kw)
    got, want = _files(tmp_path / "ours.zarr"), _files(tmp_path / "theirs.zarr")
    assert sorted(got) == sorted(want)
    assert any(k.startswith("g/inputs/c/") for k in got)  # data chunks were written too
    for key in want:
        assert got[key] == want[key], key
    reopened = zarr.open_group(str(tmp_path / "ours.zarr"), mode="r")
    np.testing.assert_array_equal(reopened["g/inputs"][:], arrays[3][1]["data"])
    assert dict(reopened["g/sub"].attrs) == {"long_name": "nested"}


def test_creating_over_existing_nodes_goes_through_zarr(tmp_path):
    """Where a node exists, zarr decides: an existing group is an error unless it is
    to be overwritten, and then everything under it goes."""
    from gramlin_analyze.store import create_nodes

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    old = root.create_group("g", attributes={"old": True})
    old.create_array("stale", shape=(3,), dtype="float32")[:] = 1.0
    with pytest.raises(zarr.errors.ContainsGroupError):
        create_nodes(root.store, groups=[("g", {"new": True})])
    create_nodes(
        root.store,
        groups=[("g", {"new": True})],
        arrays=[("g/fresh", dict(shape=(2,), dtype="int64", fill_value=-1))],
        overwrite_groups=True,
    )
    reopened = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert dict(reopened["g"].attrs) == {"new": True}
    assert sorted(reopened["g"].array_keys()) == ["fresh"]
    assert not (tmp_path / "s.zarr" / "g" / "stale").exists()
    # A missing parent: zarr makes it (an implicit group), as it would have.
    create_nodes(root.store, arrays=[("a/b/c", dict(shape=(2,), dtype="float32"))])
    assert zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["a/b/c"].shape == (2,)
    # An array cannot have children: zarr refuses, and nothing is written under it.
    with pytest.raises(ValueError):
        create_nodes(root.store, arrays=[("g/fresh/child", dict(shape=(2,), dtype="float32"))])
    assert not (tmp_path / "s.zarr" / "g" / "fresh" / "child").exists()


def test_updating_attributes_merges_them(tmp_path):
    from gramlin_analyze.store.chunks import update_attributes_all

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    g = root.create_group("g", attributes={"kept": 1, "changed": "old"})
    a = root.create_array("a", shape=(2,), dtype="f4", attributes={"long_name": "a"})
    update_attributes_all([(g, {"changed": "new", "added": [1, 2]}), (a, {"units": "1"})])
    again = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert dict(again["g"].attrs) == {"kept": 1, "changed": "new", "added": [1, 2]}
    assert dict(again["a"].attrs) == {"long_name": "a", "units": "1"}
