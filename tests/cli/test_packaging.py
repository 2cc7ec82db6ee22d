"""The wheel ships the JSON Schemas and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gramlin_analyze.schemas import load_schema, schema_dir

REPO = Path(__file__).resolve().parents[2]


def test_schemas_load():
    assert {p.name for p in schema_dir().glob("*.schema.json")} >= {
        "store.schema.json",
        "steps.schema.json",
        "layer.schema.json",
        "probe.schema.json",
    }
    assert load_schema("steps")["$defs"]["row"]["properties"]["status"]["enum"] == [
        "ok",
        "pending",
        "failed",
    ]


def test_wheel_contains_schemas(tmp_path):
    pytest.importorskip("hatchling")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gramlin_analyze-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for schema in schema_dir().glob("*.schema.json"):
        assert f"gramlin_analyze/schemas/{schema.name}" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "gramlin-analyze = gramlin_analyze.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    )


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "gramlin_analyze", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("scan", "ingest", "analyze", "info", "validate", "report", "summary"):
        assert command in out.stdout
