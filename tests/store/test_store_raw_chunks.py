"""Whole-step writes that go straight to the chunk file: same bytes as zarr's own."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, ZstdCodec

from gramlin_analyze.store import direct_io, put_step, raw_chunk_path, read_step


@pytest.fixture
def no_refusals():
    """No file system remembered as refusing O_DIRECT, before and after: a refusal
    faked by a test must not reach the next one."""
    direct_io.forget_refused_devices()
    yield
    direct_io.forget_refused_devices()


def _pair(tmp_path, dtype, shape, **kw):
    """Two identical arrays in one group: one written by put_step, one by zarr."""
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arrays = [
        root.create_array(
            name, shape=(4, *shape), chunks=(1, *shape), dtype=dtype, fill_value=0, **kw
        )
        for name in ("fast", "zarr")
    ]
    return root, arrays


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        ("float32", (7, 5)),
        ("float64", (3, 4, 2)),
        ("float16", (6,)),
        ("int64", (2, 3)),
        ("bool", (5, 5)),
    ],
)
def test_put_step_writes_the_bytes_zarr_would(tmp_path, dtype, shape):
    root, (fast, ref) = _pair(tmp_path, dtype, shape, compressors=None)
    rng = np.random.default_rng(7)
    for i in (2, 0):
        value = (rng.standard_normal(shape) * 5).astype(dtype)
        assert raw_chunk_path(fast, (i,) + (0,) * len(shape)) is not None
        put_step(fast, i, value)
        ref[i : i + 1] = value[None]
        key = fast.metadata.encode_chunk_key((i,) + (0,) * len(shape))
        assert (tmp_path / "s.zarr" / "fast" / key).read_bytes() == (
            tmp_path / "s.zarr" / "zarr" / key
        ).read_bytes()
        np.testing.assert_array_equal(
            zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["fast"][i], value
        )
        np.testing.assert_array_equal(read_step(fast, i, np.empty(shape, dtype)), value)
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))
    np.testing.assert_array_equal(fast[:], ref[:])  # untouched rows read as the fill value


def test_put_step_writes_through_zarr_when_the_chunk_file_is_not_the_values(tmp_path):
    rng = np.random.default_rng(8)
    value = rng.standard_normal((6, 4)).astype("float32")
    for kw in (
        {"compressors": ZstdCodec()},
        {"compressors": None, "serializer": BytesCodec(endian="big")},
    ):
        _, (fast, _) = _pair(tmp_path, "float32", (6, 4), **kw)
        assert raw_chunk_path(fast, (1, 0, 0)) is None
        put_step(fast, 1, value)
        np.testing.assert_array_equal(fast[1], value)
    # a row split over several chunks: zarr writes it
    root = zarr.open_group(str(tmp_path / "t.zarr"), mode="w", zarr_format=3)
    split = root.create_array(
        "a", shape=(3, 6, 4), chunks=(1, 3, 4), dtype="float32", compressors=None
    )
    put_step(split, 2, value)
    np.testing.assert_array_equal(split[2], value)
    # read-only handle: no raw path
    ro = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")["a"]
    assert raw_chunk_path(ro, (0, 0, 0)) is None


def test_put_rows_matches_zarr_for_whole_and_partial_chunks(tmp_path):
    """Activation rows: whole chunks take the raw path, the ragged last chunk and
    unaligned pieces go through zarr; the stored values and bytes agree."""
    from gramlin_analyze.store import put_rows

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    kw = dict(
        shape=(2, 10, 3), chunks=(1, 4, 3), dtype="float32", fill_value=np.nan, compressors=None
    )
    fast, ref = root.create_array("fast", **kw), root.create_array("zarr", **kw)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((10, 3)).astype("float32")
    for first, stop in ((0, 4), (4, 8), (8, 10)):  # two whole chunks, then the ragged one
        put_rows(fast, 1, first, x[first:stop])
        ref[1:2, first:stop] = x[first:stop][None]
    put_rows(fast, 0, 1, x[1:3])  # unaligned: through zarr
    ref[0:1, 1:3] = x[1:3][None]
    np.testing.assert_array_equal(fast[:], ref[:])
    np.testing.assert_array_equal(fast[1], x)
    for key in ("c/1/0/0", "c/1/1/0", "c/1/2/0", "c/0/0/0"):
        assert (tmp_path / "s.zarr/fast" / key).read_bytes() == (
            tmp_path / "s.zarr/zarr" / key
        ).read_bytes()


def test_raw_writes_refuse_rows_outside_the_array(tmp_path):
    from gramlin_analyze.store import put_rows

    _, (fast, _) = _pair(tmp_path, "float32", (4, 3), compressors=None)
    with pytest.raises(IndexError):
        put_step(fast, 4, np.ones((4, 3), "float32"))
    root = zarr.open_group(str(tmp_path / "r.zarr"), mode="w", zarr_format=3)
    a = root.create_array("a", shape=(2, 8, 3), chunks=(1, 4, 3), dtype="float32", compressors=None)
    with pytest.raises(IndexError):
        put_rows(a, 2, 0, np.ones((4, 3), "float32"))
    assert not list((tmp_path / "s.zarr" / "fast").rglob("c/4/*")) and not list(
        (tmp_path / "r.zarr").rglob("c/2/*")
    )


@pytest.mark.parametrize("nbytes", [(1 << 20), (1 << 20) + 12, (9 << 20) + 4])
@pytest.mark.parametrize("aligned", [True, False])
def test_direct_io_writes_the_same_bytes(tmp_path, monkeypatch, nbytes, aligned):
    """Large chunks bypass the page cache (O_DIRECT): the file holds exactly the
    array's bytes, page-aligned source or not, whole blocks or a ragged tail
    (padded for the device, then truncated), as through the page cache."""
    import mmap

    rng = np.random.default_rng(nbytes)
    raw = rng.integers(0, 256, nbytes, dtype=np.uint8)
    if aligned:
        src = np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)
        src[:] = raw
        assert src.ctypes.data % 4096 == 0
    else:
        src = np.empty(nbytes + 1, np.uint8)[1:]
        src[:] = raw
    went_direct = direct_io.write_raw_chunk(tmp_path / "direct", src)
    monkeypatch.setenv("GRAMLIN_DIRECT_IO", "0")
    assert direct_io.write_raw_chunk(tmp_path / "cached", src) is False
    # the first went direct unless this file system refuses O_DIRECT
    assert went_direct is (os.stat(tmp_path).st_dev not in direct_io.refused_devices())
    assert (tmp_path / "direct").read_bytes() == raw.tobytes() == (tmp_path / "cached").read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_direct_io_falls_back_where_the_file_system_refuses_it(tmp_path, monkeypatch, no_refusals):
    """A file system that rejects O_DIRECT (EINVAL on open, faked: the kernels of
    today accept it even on tmpfs) is written through the page cache, and
    remembered so that the next chunk does not try again."""
    import errno

    real_open = os.open
    tries = []

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            tries.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    x = np.random.default_rng(1).standard_normal(300_000)  # 2.4 MB
    for name in ("a", "b"):
        assert direct_io.write_raw_chunk(tmp_path / name, x) is False
        np.testing.assert_array_equal(np.fromfile(tmp_path / name), x)
    assert len(tries) == 1
    assert direct_io.refused_devices() == {os.stat(tmp_path).st_dev}
    assert not list(tmp_path.glob("*.partial"))


def test_direct_writes_fall_back_where_aligned_writes_are_refused(
    tmp_path, monkeypatch, no_refusals
):
    """A file system may accept O_DIRECT at open and still refuse the writes
    (EINVAL, faked here): the chunk is written through the page cache, whole,
    and the device is remembered."""
    import errno
    import fcntl

    real = os.pwrite

    def refusing(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    x = np.random.default_rng(5).standard_normal(300_000)  # 2.4 MB
    assert direct_io.write_raw_chunk(tmp_path / "a", x) is False
    np.testing.assert_array_equal(np.fromfile(tmp_path / "a"), x)
    assert direct_io.refused_devices() == {os.stat(tmp_path).st_dev}
    assert not list(tmp_path.glob("*.partial"))


def test_step_major_chunks_are_flat_files(tmp_path):
    """Weights and activations keep each chunk as a file in its array's directory
    (``c.<step>.<row>.<col>``), not a directory per step."""
    import gramlin_analyze as ga
    from tests.trajectory import write_trajectory

    write_trajectory(tmp_path / "run", [0, 10, 20])
    ga.ingest(tmp_path / "run", tmp_path / "s.zarr")
    for array in ("weight", "bias"):
        names = sorted(p.name for p in (tmp_path / "s.zarr/layers/fc1" / array).iterdir())
        assert names == [
            "c.0.0" + ".0" * (array == "weight"),
            "c.1.0" + ".0" * (array == "weight"),
            "c.2.0" + ".0" * (array == "weight"),
            "zarr.json",
        ]
    from gramlin_analyze.store.validate import validate_store

    assert validate_store(tmp_path / "s.zarr") == []
    (tmp_path / "s.zarr/layers/fc1/weight/c.1.0.0").unlink()  # lost behind the store's back
    assert validate_store(tmp_path / "s.zarr") == [
        "layers/fc1/weight: step 10 is marked ok but its chunks are missing; re-run ingest to rewrite it"
    ]


@pytest.mark.parametrize("aligned", [True, False])
def test_read_step_reads_whole_chunk_files_directly(tmp_path, aligned):
    """read_step(out=...) takes a one-step chunk straight from its file (O_DIRECT
    for large ones, into a page-aligned ``out`` or through the staging buffer);
    a chunk never written still reads as the fill value (through zarr)."""
    from gramlin_analyze.store import aligned_empty

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    shape = (513, 517)  # 1.06 MB of float32: direct, with a ragged last block
    arr = root.create_array(
        "w",
        shape=(3, *shape),
        chunks=(1, *shape),
        dtype="float32",
        fill_value=np.nan,
        compressors=None,
    )
    x = np.random.default_rng(3).standard_normal(shape).astype("float32")
    put_step(arr, 1, x)
    out = (
        aligned_empty(shape, "float32")
        if aligned
        else np.empty((shape[0] * shape[1] + 1,), "float32")[1:].reshape(shape)
    )
    np.testing.assert_array_equal(read_step(arr, 1, out), x)
    assert np.isnan(read_step(arr, 0, out)).all()  # no file: zarr's fill value
    np.testing.assert_array_equal(read_step(arr, 1, out), x)


def test_direct_reads_fall_back_where_aligned_reads_are_refused(tmp_path, monkeypatch, no_refusals):
    """A file system may accept O_DIRECT at open and still refuse the reads
    (EINVAL, faked here): the chunk is read through the page cache, and the
    device is remembered."""
    import errno
    import fcntl

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arr = root.create_array(
        "w", shape=(2, 600, 600), chunks=(1, 600, 600), dtype="float32", compressors=None
    )
    x = np.random.default_rng(4).standard_normal((600, 600)).astype("float32")
    put_step(arr, 1, x)
    real = os.preadv

    def refusing(fd, buffers, offset, *args):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", refusing)
    np.testing.assert_array_equal(read_step(arr, 1, np.empty((600, 600), "float32")), x)
    assert direct_io.refused_devices() == {os.stat(tmp_path / "s.zarr" / "w").st_dev}
