"""A remote writer's copy of the metadata agrees with the store, on a real S3 server.

The writer makes the consolidated metadata from the documents it has read
and written (``metadata_cache.py``) instead of reading every node back; it
must be the copy zarr's own ``consolidate_metadata`` makes from the store.
"""

from __future__ import annotations

import json

import numpy as np
import zarr

from gramlin_analyze.ingest import ingest
from gramlin_analyze.store import GramlinStore, WriteSession, zarr_store
from gramlin_analyze.store.consolidated import quiet_consolidated
from tests.s3_server import S3, S3_BUCKET
from tests.trajectory import write_trajectory


def _consolidated(s3: S3, prefix: str) -> dict:
    doc = s3.client.get_object(Bucket=S3_BUCKET, Key=f"{prefix}/zarr.json")["Body"].read()
    return json.loads(doc)["consolidated_metadata"]["metadata"]


def test_the_copy_made_in_memory_is_zarrs_own(s3_server: S3, tmp_path):
    s3, so = s3_server, s3_server.storage_options
    run = tmp_path / "run"
    write_trajectory(run, [0, 10])
    url = f"s3://{S3_BUCKET}/cache/run.zarr"
    ingest(run, url, storage_options=so)
    write_trajectory(run, [5, 20], seed=1)  # one step inserted, one appended
    ingest(run, url, storage_options=so)
    made = _consolidated(s3, "cache/run.zarr")
    with quiet_consolidated():
        zarr.consolidate_metadata(zarr_store(url, storage_options=so), zarr_format=3)
    assert made == _consolidated(s3, "cache/run.zarr")
    assert made["layers/fc1/weight"]["shape"][0] == 4


def test_the_copy_follows_the_writers_changes(s3_server: S3, tmp_path):
    """Documents written, grown and deleted through the writer are what it reads back
    (from its copy), a node it never made does not exist, and the copy it writes
    at the close is what a reader then finds."""
    so = s3_server.storage_options
    run = tmp_path / "run"
    write_trajectory(run, [0])
    url = f"s3://{S3_BUCKET}/cache2/run.zarr"
    ingest(run, url, storage_options=so)
    with WriteSession(url, storage_options=so) as gs:
        gs.set_step_axis(np.array([0, 1]))
        cache = gs.zstore
        assert cache.complete
        assert len(gs.root["layers/fc1/weight"].shape) == 3
        assert gs.root["layers/fc1/weight"].shape[0] == 2
        assert "nothing" not in gs.root
        gs.structure_changed()
        del gs.root["layers"]
        assert "layers" not in gs.root
        assert not any(k.startswith("layers/") for k in cache.shared.docs)
        gs.ensure_consolidated()
    reader = GramlinStore(url, storage_options=so)
    assert list(reader.steps()) == [0, 1] and reader.layer_names() == []
