"""What a store holds before an ingest: its layers, manifest and probe, read once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gramlin_analyze.errors import StoreError
from gramlin_analyze.store import GramlinStore
from gramlin_analyze.store import layout as L
from gramlin_analyze.store.faults import StoreUnavailableError

if TYPE_CHECKING:
    from gramlin_analyze.ingest.plan import Request

__all__ = ["Stored", "fingerprint_rows", "is_store", "ok_fingerprints"]


def is_store(store: str, storage_options: dict | None) -> bool:
    """Whether a gramlin store is at ``store`` already."""
    try:
        GramlinStore(store, mode="r", storage_options=storage_options)
    except StoreUnavailableError:
        raise
    except StoreError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Stored:
    """What a store holds before the command (nothing, for a new store)."""

    url: str
    attrs: dict[str, Any]
    manifest: dict[str, np.ndarray]
    template: dict[str, tuple[tuple[int, ...], str, bool]]
    probe_attrs: dict[str, Any] | None  # None: no /probe
    activation_layers: list[str]  # layers whose activation arrays are declared

    @classmethod
    def read(cls, gs: GramlinStore | None, req: Request) -> Stored:
        if gs is None:
            return cls(req.store, {}, _empty_manifest(), {}, None, [])
        view = gs.view
        names = gs.layer_names()
        template = {}
        for name in names:
            a = dict(gs.layer(name).attrs)
            template[name] = (tuple(a["source_shape"]), a["source_dtype"], bool(a["has_bias"]))
        probe_attrs = dict(view[L.PROBE].attrs) if L.PROBE in view else None
        activations = (
            probe_attrs is not None or req.capture is not None or req.activations is not None
        )
        return cls(
            url=req.store,
            attrs=dict(gs.root.attrs),
            manifest=gs.manifest() if L.STEPS in view else _empty_manifest(),
            template=template,
            probe_attrs=probe_attrs,
            activation_layers=[n for n in names if "input" in gs.layer(n)] if activations else [],
        )


def _empty_manifest() -> dict[str, np.ndarray]:
    man = {"step": np.zeros(0, dtype=np.int64)}
    for name, (dtype, *_) in L.MANIFEST.items():
        man[name] = np.zeros(0, dtype=object if dtype is str else dtype)
    return man


def fingerprint_rows(man: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """``{source_path: (stat_key, fingerprint)}`` of the manifest's ok rows."""
    if "stat_key" not in man:
        return {}
    return {
        str(p): (str(k), str(f))
        for p, k, f, st in zip(
            man["source_path"], man["stat_key"], man["fingerprint"], man["status"], strict=True
        )
        if st == "ok" and k
    }


def ok_fingerprints(man: dict[str, np.ndarray]) -> dict[int, str]:
    """``{step: fingerprint}`` of the manifest's ok rows."""
    return {
        int(s): fp
        for s, status, fp in zip(man["step"], man["status"], man["fingerprint"], strict=True)
        if status == "ok"
    }
