"""A conformance suite every checkpoint reader passes (the zarr/fsspec pattern).

A reader's test module subclasses :class:`ReaderConformance` and supplies one
fixture, ``written``, that writes a tiny real checkpoint to ``tmp_path`` with
the framework's own saving code and returns a :class:`Written`::

    from gramlin_analyze.testing import ReaderConformance, Written

    class TestMyReader(ReaderConformance):
        reader_name = "myformat"

        @pytest.fixture
        def written(self, tmp_path):
            ...  # save a tiny checkpoint with the framework's own code
            return Written(path, expected={"fc1.weight": w}, main_file=path)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from gramlin_analyze.errors import CheckpointFormatError
from gramlin_analyze.io.registry import get_reader, guess_reader


@dataclass
class Written:
    path: Path
    #: tensor name (as the reader reports it) -> expected array in (out, in, *kernel) order
    expected: dict[str, np.ndarray]
    #: the file to corrupt for the bad-input checks (the path itself for single files)
    main_file: Path
    step: int | None = None
    extra_meta: dict = field(default_factory=dict)


class ReaderConformance:
    reader_name: str = ""

    @pytest.fixture
    def reader(self):
        return get_reader(self.reader_name)

    def test_guess_can_read(self, reader, written):
        assert reader.guess_can_read(written.path)

    def test_guess_reader_picks_this_reader(self, written):
        assert guess_reader(written.path).name == self.reader_name

    def test_list_tensors(self, reader, written):
        infos = reader.list_tensors(written.path)
        for name, arr in written.expected.items():
            assert name in infos, f"{name} missing from {sorted(infos)}"
            assert tuple(infos[name].shape) == arr.shape
            assert infos[name].name == name

    def test_read_tensor_values(self, reader, written):
        for name, arr in written.expected.items():
            got = reader.read_tensor(written.path, name)
            assert isinstance(got, np.ndarray)
            assert got.shape == arr.shape
            np.testing.assert_array_equal(got, arr)

    def test_handle_reads_everything(self, reader, written):
        with reader.open(written.path) as h:
            infos = h.list_tensors()
            for name, arr in written.expected.items():
                np.testing.assert_array_equal(h.read_tensor(name), arr)
                assert infos[name].shape == arr.shape

    def test_unknown_tensor_is_keyerror(self, reader, written):
        with pytest.raises(KeyError, match="no_such_tensor"):
            reader.read_tensor(written.path, "no_such_tensor")

    def test_metadata_step(self, reader, written):
        meta = reader.read_metadata(written.path)
        if written.step is not None:
            assert meta.step == written.step
        for key, value in written.extra_meta.items():
            assert getattr(meta, key) == pytest.approx(value)

    def _assert_bad(self, reader, written):
        with pytest.raises(CheckpointFormatError) as info:
            infos = reader.list_tensors(written.path)
            for name in infos:
                reader.read_tensor(written.path, name)
        # The message names the file so a user can find it.
        assert written.main_file.name in str(info.value)

    def test_truncated_file(self, reader, written):
        size = written.main_file.stat().st_size
        with open(written.main_file, "r+b") as f:
            f.truncate(max(1, size // 2))
        self._assert_bad(reader, written)

    def test_random_bytes(self, reader, written):
        rng = np.random.default_rng(0)
        written.main_file.write_bytes(rng.bytes(4096))
        self._assert_bad(reader, written)

    def test_empty_file(self, reader, written):
        written.main_file.write_bytes(b"")
        self._assert_bad(reader, written)


def seeded_arrays(seed: int, shapes: dict[str, tuple[int, ...]], dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


__all__ = ["ReaderConformance", "Written", "seeded_arrays", "os"]
