"""Access to the JSON Schemas that describe the store (shipped in the wheel)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

__all__ = ["load_schema", "schema_dir"]


def schema_dir() -> Path:
    """The folder of JSON Schemas: inside the installed wheel, or the repo's ``schemas/``."""
    packaged = resources.files("gramlin_analyze") / "schemas"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "schemas"


@cache
def load_schema(name: str) -> dict:
    """Load ``<name>.schema.json``."""
    return json.loads((schema_dir() / f"{name}.schema.json").read_text())
