"""Edge cases found in review: token labels, external multi-row activations, partial capture,
all-NaN weights, float16 weights, mistyped paths, bad learning-rate schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file

import gramlin_analyze as ga
from gramlin_analyze.capture.task import CaptureConfig
from gramlin_analyze.errors import ProbeError, StoreError, UsageError
from gramlin_analyze.store.validate import validate_store
from tests.capture_models import build_token_model


def ref_tl(H, Y):
    Yc = Y - Y.mean(axis=0)
    B, *_ = np.linalg.lstsq(H, Yc, rcond=None)
    return 1 - np.sum((Yc - H @ B) ** 2) / np.sum(Yc**2)


def test_token_labels_pair_with_their_positions(tmp_path):
    rng = np.random.default_rng(21)
    x = rng.integers(0, 10, (20, 5))
    y = (x % 3).astype(np.int64)  # one label per token
    run = tmp_path / "run"
    run.mkdir()
    model = build_token_model()
    for step in (0, 1):
        torch.save(model.state_dict(), run / f"step_{step}.pt")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    np.savez(tmp_path / "p.npz", inputs=x, labels=y)
    cfg = CaptureConfig(
        probe=str(tmp_path / "p.npz"), model="tests.capture_models:build_token_model"
    )
    assert not ga.ingest(run, tmp_path / "s.zarr", capture=cfg, lr=0.1).failed
    report = ga.analyze(tmp_path / "s.zarr", metrics=["tl"])
    assert report.partial == {
        "tl": ["emb"]
    }  # the embedding has no captured input; the others still run
    tree = xr.open_datatree(str(tmp_path / "s.zarr"), engine="zarr")
    for layer in ("fc", "out"):
        H = tree[f"layers/{layer}"]["input"].sel(step=1).values.astype(np.float64)
        assert H.shape[0] == 100
        expected = ref_tl(H, np.eye(3)[y.reshape(-1)])
        got = float(tree["metrics"]["target_linearity"].sel(step=1, layer=layer))
        np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_external_activations_with_positions(tmp_path):
    rng = np.random.default_rng(22)
    run = tmp_path / "run"
    run.mkdir()
    save_file(
        {"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)}, str(run / "step_0.safetensors")
    )
    labels = rng.integers(0, 3, 10)
    np.savez(
        tmp_path / "p.npz", inputs=rng.standard_normal((10, 6)).astype(np.float32), labels=labels
    )
    acts = tmp_path / "acts"
    acts.mkdir()
    H = rng.standard_normal((20, 4)).astype(np.float32)  # 2 positions per example, example-major
    np.savez(
        acts / "step_0.npz",
        **{"fc/input": H, "fc/input_grad": rng.standard_normal((20, 4)).astype(np.float32)},
    )
    ga.ingest(run, tmp_path / "s.zarr", activations=acts, probe=tmp_path / "p.npz")
    ga.analyze(tmp_path / "s.zarr", metrics=["tl"], conv_samples="position")
    got = float(ga.open(tmp_path / "s.zarr")["metrics"]["target_linearity"].sel(step=0, layer="fc"))
    np.testing.assert_allclose(
        got, ref_tl(H.astype(np.float64), np.eye(3)[np.repeat(labels, 2)]), rtol=1e-8
    )
    ga.analyze(tmp_path / "s.zarr", metrics=["tl"], conv_samples="image")  # one per example
    got = float(ga.open(tmp_path / "s.zarr")["metrics"]["target_linearity"].sel(step=0, layer="fc"))
    np.testing.assert_allclose(got, ref_tl(H.astype(np.float64).reshape(10, 8), np.eye(3)[labels]))
    np.savez(
        tmp_path / "other.npz",
        inputs=rng.standard_normal((10, 6)).astype(np.float32),
        labels=labels,
    )
    with pytest.raises(ProbeError, match="differs"):
        ga.ingest(run, tmp_path / "s.zarr", activations=acts, probe=tmp_path / "other.npz")


def test_all_nan_weight_is_stored_and_validates(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_file({"fc.weight": torch.randn(3, 4)}, str(run / "step_0.safetensors"))
    save_file({"fc.weight": torch.full((3, 4), float("nan"))}, str(run / "step_1.safetensors"))
    report = ga.ingest(run, tmp_path / "s.zarr")
    assert report.nonfinite == {1: 12} and not report.failed
    assert validate_store(tmp_path / "s.zarr") == []


def test_float16_weights_gram_change(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    g = torch.Generator().manual_seed(5)
    w0 = (torch.randn(64, 64, generator=g) * 4).half()
    w1 = (w0.float() + 0.01 * torch.randn(64, 64, generator=g)).half()
    for step, w in ((0, w0), (1, w1)):
        save_file({"fc.weight": w}, str(run / f"step_{step}.safetensors"))
    ga.ingest(run, tmp_path / "s.zarr")
    ga.analyze(tmp_path / "s.zarr", metrics=["gram"])
    a, b = w0.double().numpy(), w1.double().numpy()
    G0, G1 = a.T @ a, b.T @ b
    expected = np.linalg.norm(G1 - G0) / np.linalg.norm(G0)
    got = float(ga.open(tmp_path / "s.zarr")["metrics"]["gram_change"].sel(step=1, layer="fc"))
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_mistyped_store_is_an_error_and_creates_nothing(tmp_path):
    with pytest.raises(StoreError, match="not a gramlin store"):
        ga.analyze(tmp_path / "typo.zarr")
    assert not (tmp_path / "typo.zarr").exists()


def test_bad_lr_schedule_fails_before_writing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (0, 10):
        save_file({"fc.weight": torch.randn(3, 4)}, str(run / f"step_{step}.safetensors"))
    (tmp_path / "lr.csv").write_text("step,lr\n5,0.1\n")
    with pytest.raises(UsageError):
        ga.ingest(run, tmp_path / "s.zarr", lr_schedule=tmp_path / "lr.csv")
    assert not (tmp_path / "s.zarr").exists()


def test_factory_gets_the_checkpoints_config_json(tmp_path):
    import json

    from tests.capture_models import build_from_config

    rng = np.random.default_rng(23)
    run = tmp_path / "run"
    model = build_from_config({"hidden_size": 9})
    for step in (10, 20):
        d = run / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors")
        )
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        (d / "config.json").write_text(json.dumps({"hidden_size": 9}))
    np.savez(
        tmp_path / "p.npz",
        inputs=rng.standard_normal((8, 5)).astype(np.float32),
        labels=rng.integers(0, 3, 8),
    )
    cfg = CaptureConfig(
        probe=str(tmp_path / "p.npz"), model="tests.capture_models:build_from_config"
    )
    report = ga.ingest(run, tmp_path / "s.zarr", capture=cfg, lr=0.1)
    assert report.ingested == [10, 20] and not report.failed
    assert ga.open(tmp_path / "s.zarr")["layers/2"]["input"].shape == (2, 8, 9)


def _node_shapes(path, consolidated: bool) -> dict[str, tuple]:
    import zarr

    root = zarr.open_group(str(path), mode="r", zarr_format=3, use_consolidated=consolidated)
    return {
        p: (tuple(n.shape) if isinstance(n, zarr.Array) else "group")
        for p, n in root.members(max_depth=None)
    }


def test_consolidated_metadata_is_current_after_ingest_and_analyze(tmp_path):
    """ingest and analyze finish with one root write (no final re-consolidation):
    the consolidated copy must still list every node with its current shape,
    including after a step is inserted before existing ones."""
    from tests.trajectory import write_trajectory

    run, store = tmp_path / "run", tmp_path / "s.zarr"
    write_trajectory(run, [10, 30, 40])
    ga.ingest(run, store)
    assert _node_shapes(store, True) == _node_shapes(store, False)
    ga.analyze(store, metrics=["gram"])
    assert _node_shapes(store, True) == _node_shapes(store, False)
    write_trajectory(run, [20], seed=1)  # lands between ok steps: rows move
    ga.ingest(run, store)
    shapes = _node_shapes(store, True)
    assert shapes == _node_shapes(store, False)
    assert shapes["layers/fc1/weight"] == (4, 6, 5) and shapes["metrics/fc1/gram"] == (4, 5, 5)
    ga.analyze(store, metrics=["gram"])
    assert _node_shapes(store, True) == _node_shapes(store, False)
    notes: list[str] = []
    assert validate_store(str(store), notes=notes) == []
    assert not [n for n in notes if "consolidated" in n]


def test_a_failing_phase2_keeps_the_finished_phase1_results(tmp_path, monkeypatch):
    """A phase-2 error (here injected through its public entry point) surfaces,
    and the per-step results that finished before it are flushed with their
    provenance: the next run does not redo them."""
    from gramlin_analyze.analysis import phase2
    from tests.trajectory import write_trajectory

    run, store = tmp_path / "run", tmp_path / "s.zarr"
    write_trajectory(run, [0, 10, 20])
    ga.ingest(run, store)
    real = phase2.layer_chain_task

    def failing(url: str, storage_options: dict | None, job: phase2.ChainJob):
        if job.layer == "fc2":
            raise RuntimeError("injected phase-2 failure")
        return real(url, storage_options, job)

    monkeypatch.setattr(phase2, "layer_chain_task", failing)
    with pytest.raises(RuntimeError, match="injected"):
        ga.analyze(store, metrics=["gram"])
    monkeypatch.undo()
    again = ga.analyze(store, metrics=["gram"])
    assert (again.computed, again.up_to_date) == (0, 6)  # 3 steps x 2 layers, none redone
    m = ga.open(store)["metrics"].to_dataset()
    W = ga.open(store)["layers/fc2"]["weight"].values.astype(np.float64)
    G1, G2 = W[1].T @ W[1], W[2].T @ W[2]
    np.testing.assert_allclose(
        float(m["gram_change"].sel(step=20, layer="fc2")),
        np.linalg.norm(G2 - G1) / np.linalg.norm(G1),
        rtol=1e-4,
    )


def test_a_writer_stopped_midway_is_consolidated_by_the_next(tmp_path, monkeypatch):
    """Consolidation is deferred to once per command; a writer that changed the
    structure and stopped before consolidating (killed) leaves
    ``consolidated_current`` false, and the next ingest or analyze repairs the
    consolidated copy before its tasks read it."""
    from gramlin_analyze.store import CONSOLIDATED_ATTR, GramlinStore
    from tests.trajectory import write_trajectory

    run, store = tmp_path / "run", tmp_path / "s.zarr"
    write_trajectory(run, [0, 10, 20])
    ga.ingest(run, store)
    ga.analyze(store, metrics=["gram"])
    gs = GramlinStore(store, mode="a")
    assert gs.root.attrs[CONSOLIDATED_ATTR] is True

    def killed(self):
        raise KeyboardInterrupt("killed after resizing, before consolidating")

    monkeypatch.setattr(GramlinStore, "consolidate", killed)
    with gs.lock(), pytest.raises(KeyboardInterrupt):
        gs.set_step_axis(np.asarray([0, 10, 20, 30]))
    monkeypatch.undo()
    assert GramlinStore(store).root.attrs[CONSOLIDATED_ATTR] is False
    assert _node_shapes(store, True)["layers/fc1/weight"] == (3, 6, 5)  # stale
    assert _node_shapes(store, False)["layers/fc1/weight"] == (4, 6, 5)
    rep = ga.analyze(store, metrics=["gram"])  # its tasks read the consolidated copy
    assert rep.computed == 0 and rep.skipped_steps == {30: "pending"}
    assert _node_shapes(store, True) == _node_shapes(store, False)
    assert GramlinStore(store).root.attrs[CONSOLIDATED_ATTR] is True
    write_trajectory(run, [30], seed=2)  # the pending step gets its checkpoint
    assert ga.ingest(run, store).ingested == [30]
    assert _node_shapes(store, True) == _node_shapes(store, False)
    assert ga.analyze(store, metrics=["gram"]).computed == 2


def test_appended_and_inserted_steps_keep_every_row(tmp_path):
    """Appending steps takes a one-batch path (resize and rewrite everything
    together), inserting one moves rows: both leave every stored row where its
    step is, with the same values as a store ingested in one go."""
    from tests.trajectory import write_trajectory

    run, store, fresh = tmp_path / "run", tmp_path / "s.zarr", tmp_path / "f.zarr"
    write_trajectory(run, [0, 20])
    ga.ingest(run, store)
    ga.analyze(store, metrics=["gram"])
    write_trajectory(run, [30, 40], seed=0)  # appended
    assert ga.ingest(run, store).ingested == [30, 40]
    write_trajectory(run, [10], seed=0)  # inserted before stored steps
    assert ga.ingest(run, store).ingested == [10]
    ga.analyze(store, metrics=["gram"])
    ga.ingest(run, fresh)
    ga.analyze(fresh, metrics=["gram"])
    a, b = ga.open(store), ga.open(fresh)
    for path in ("layers/fc1", "layers/fc2", "metrics/fc1"):
        xr.testing.assert_equal(a[path].to_dataset(), b[path].to_dataset())
    ma, mb = a["steps"].to_dataset(), b["steps"].to_dataset()
    for name in ("step", "status", "fingerprint", "nonfinite", "bytes"):
        np.testing.assert_array_equal(ma[name].values, mb[name].values)
    assert list(ma["status"].values) == ["ok"] * 5
    assert _node_shapes(store, True) == _node_shapes(store, False)
    assert validate_store(str(store)) == []


def test_a_store_last_written_by_an_older_version_is_consolidated_first(tmp_path):
    """Versions before 0.2.0 do not keep ``consolidated_current``: they leave it
    true while changing the structure (they consolidated first thing instead).
    Their version stamp makes the next writer consolidate before trusting it."""
    import zarr

    from gramlin_analyze.store import CONSOLIDATED_ATTR, GramlinStore
    from tests.trajectory import write_trajectory

    run, store = tmp_path / "run", tmp_path / "s.zarr"
    write_trajectory(run, [0, 10])
    ga.ingest(run, store)
    root = zarr.open_group(str(store), mode="r+", zarr_format=3, use_consolidated=None)
    root.update_attributes({"creation_library_version": "0.1.0"})  # an older writer's stamp ...
    live = zarr.open_group(str(store), mode="r+", zarr_format=3, use_consolidated=False)
    live["layers/fc1/weight"].resize((3, 6, 5))  # ... and its change, killed before consolidating
    assert GramlinStore(store).root.attrs[CONSOLIDATED_ATTR] is True
    assert _node_shapes(store, True) != _node_shapes(store, False)
    gs = GramlinStore(store, mode="a")  # the flag is not trusted: lookups go to the live metadata
    assert gs.view["layers/fc1/weight"].shape == (3, 6, 5)
    write_trajectory(run, [20])
    assert ga.ingest(run, store).ingested == [20]
    assert _node_shapes(store, True) == _node_shapes(store, False)
    assert ga.analyze(store, metrics=["gram"]).computed == 6
    assert validate_store(str(store)) == []


def test_a_new_steps_gram_change_comes_with_its_task(tmp_path, monkeypatch):
    """An incremental analyze computes a new step's Gram change in the step's
    own task (the previous Gram is stored and current), not in phase 2; the
    values equal a full analyze of the same run and an independent reference.
    Both phases compute it with ``norms.gram_norms``; no phase-2 task runs."""
    from gramlin_analyze.analysis import norms
    from tests.trajectory import write_trajectory

    run, store, fresh = tmp_path / "run", tmp_path / "s.zarr", tmp_path / "f.zarr"
    write_trajectory(run, [0, 10, 20])
    ga.ingest(run, store)
    ga.analyze(store, metrics=["gram"])
    write_trajectory(run, [30], seed=3)
    ga.ingest(run, store)

    seen: list[tuple[int, bool]] = []
    real = norms.gram_norms

    def counting(G, G_prev, rows=64):
        seen.append((G.shape[0], G_prev is None))
        return real(G, G_prev, rows)

    monkeypatch.setattr(norms, "gram_norms", counting)
    rep = ga.analyze(store, metrics=["gram"])
    monkeypatch.undo()
    assert rep.computed == 2 and rep.phase2_tasks == 0
    # per layer, in its task: the change, and the previous Gram's norm; nothing in phase 2
    assert sorted(seen) == [(d, prev) for d in (5, 6) for prev in (False, True)]
    ga.ingest(run, fresh)
    ga.analyze(fresh, metrics=["gram"])
    a = ga.open(store)["metrics"].to_dataset()["gram_change"]
    b = ga.open(fresh)["metrics"].to_dataset()["gram_change"]
    xr.testing.assert_equal(a, b)
    for layer in ("fc1", "fc2"):
        W = ga.open(store)[f"layers/{layer}"]["weight"].values.astype(np.float32).astype(np.float64)
        G = [(w.T @ w).astype(np.float32).astype(np.float64) for w in W]  # Grams as stored
        ref = [np.nan] + [
            np.linalg.norm(G[k] - G[k - 1]) / np.linalg.norm(G[k - 1]) for k in range(1, 4)
        ]
        np.testing.assert_allclose(a.sel(layer=layer).values, ref, rtol=1e-12, equal_nan=True)


def test_an_in_task_gram_change_ignores_a_non_finite_bias(tmp_path):
    """Phase 2 computes the Gram change from the two stored Grams only; a new
    step with finite weights and a NaN bias gets the same value in its task
    (found in review: the task's NaN flagging wiped it)."""
    from tests.trajectory import write_trajectory

    run, store, fresh = tmp_path / "run", tmp_path / "s.zarr", tmp_path / "f.zarr"
    write_trajectory(run, [0, 10, 20])
    ga.ingest(run, store)
    ga.analyze(store, metrics=["gram"])
    write_trajectory(run, [30], seed=3, formats=("safetensors",))
    path = run / "step_00030.safetensors"
    from safetensors.torch import load_file

    sd = load_file(str(path))
    bias = next(k for k in sd if k.endswith("bias"))
    sd[bias][0] = float("nan")
    save_file(sd, str(path))
    ga.ingest(run, store)
    rep = ga.analyze(store, metrics=["gram"])
    assert rep.computed == 2 and rep.nonfinite
    ga.ingest(run, fresh)
    ga.analyze(fresh, metrics=["gram"])
    a = ga.open(store)["metrics"].to_dataset()["gram_change"]
    b = ga.open(fresh)["metrics"].to_dataset()["gram_change"]
    xr.testing.assert_equal(a, b)
    assert np.isfinite(a.sel(step=30).values).all()
