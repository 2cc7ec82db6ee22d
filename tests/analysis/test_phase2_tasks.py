"""Phase 2 of ``analyze`` as tasks: in segments, on a cluster's workers, same values."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import gramlin_analyze as ga
from gramlin_analyze.analysis import phase2
from gramlin_analyze.capture.task import CaptureConfig

LR = 0.05
STEPS = [0, 2, 5, 6, 9]
LAYERS = 3  # Linear layers of the model below


def _ingested(tmp_path, *, n=40, seed=0):
    """An ingested trajectory of a small MLP, with its captured inputs and gradients."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    y = rng.integers(0, 3, n)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(max(STEPS) + 1):
        if step in STEPS:
            torch.save(model.state_dict(), run / f"step_{step:04d}.pt")
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    np.savez(tmp_path / "probe.npz", inputs=x, labels=y)
    cfg = CaptureConfig(
        probe=str(tmp_path / "probe.npz"), model="tests.capture_models:build_mlp", batch_size=16
    )
    store = tmp_path / "s.zarr"
    ga.ingest(run, store, capture=cfg, lr=LR)
    return store


def _metrics(store) -> dict[str, np.ndarray]:
    """Every array under ``/metrics``, read with zarr alone."""
    out = {}

    def walk(group, prefix: str) -> None:
        for name, node in group.members():
            if isinstance(node, zarr.Group):
                walk(node, f"{prefix}{name}/")
            else:
                out[prefix + name] = node[...]

    walk(zarr.open_group(str(store), mode="r")["metrics"], "")
    return out


def _assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if x.dtype.kind == "f":
            x, y = x.view(np.uint8), y.view(np.uint8)
        np.testing.assert_array_equal(x, y, err_msg=name)


def _reference_accumulated(store, layer: str) -> np.ndarray:
    """Trapezoid sums of the stored VCS over the checkpoint intervals, in float64."""
    root = zarr.open_group(str(store), mode="r")
    vcs = np.asarray(root[f"metrics/{layer}/vcs"][...], dtype=np.float64)
    steps = np.asarray(root["steps/step"][...], dtype=np.float64)
    acc = [np.zeros_like(vcs[0])]
    for k in range(1, len(steps)):
        acc.append(acc[-1] + (steps[k] - steps[k - 1]) * (vcs[k - 1] + vcs[k]) / 2)
    return np.stack(acc)


def test_phase2_in_one_step_segments_gives_the_same_bits(tmp_path, monkeypatch):
    """A chain cut into one-step tasks restarts from what the store holds: the same
    /metrics to the bit as one task per layer, and the accumulated VCS as an
    independent trapezoid sum of the stored VCS."""
    store = _ingested(tmp_path)
    cut = tmp_path / "cut.zarr"
    shutil.copytree(store, cut)
    whole = ga.analyze(store, metrics=["gram", "vc"])
    assert whole.phase2_tasks == LAYERS
    monkeypatch.setattr(phase2, "SEGMENT_SECONDS", 0.0)
    parts = ga.analyze(cut, metrics=["gram", "vc"])
    # one step per task: the Gram changes after the first step (its own task has
    # it), then every VC step; the last Gram step's task also starts the VC chain
    assert parts.phase2_tasks == LAYERS * ((len(STEPS) - 1) + len(STEPS) - 1)
    _assert_same_bits(_metrics(store), _metrics(cut))
    m = _metrics(cut)
    for layer in ("0", "2", "4"):
        np.testing.assert_allclose(
            m[f"{layer}/vcs_accumulated"], _reference_accumulated(cut, layer), rtol=1e-12
        )
    again = ga.analyze(cut, metrics=["gram", "vc"])
    assert (again.computed, again.phase2_tasks) == (0, 0)


def test_a_stale_chain_restarts_at_its_first_stale_step(tmp_path):
    """Forgetting one step's phase-2 provenance reruns the layer's chain from there
    only, with the same values."""
    store = _ingested(tmp_path)
    ga.analyze(store, metrics=["vc"])
    before = _metrics(store)
    root = zarr.open_group(str(store), mode="r+")
    prov = root["metrics/_inputs/vc_phase2"]
    layers = list(root["metrics/layer"][...])
    col = layers.index("2")
    prov[3, col] = ""
    rep = ga.analyze(store, metrics=["vc"])
    assert (rep.computed, rep.phase2_tasks) == (0, 1)
    _assert_same_bits(before, _metrics(store))


@pytest.mark.slow
def test_phase2_runs_on_the_cluster_workers(tmp_path):
    """With a distributed cluster every task, phase 2 included, runs on a worker
    (the scheduler's task stream counts them), with the values of a threaded run."""
    from distributed import Client, LocalCluster, get_task_stream

    store = _ingested(tmp_path)
    threaded = tmp_path / "threads.zarr"
    shutil.copytree(store, threaded)
    ref = ga.analyze(threaded, metrics=["gram", "vc"])
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        with get_task_stream(client) as stream:
            rep = ga.analyze(store, metrics=["gram", "vc"], client=client)
        workers = set(client.scheduler_info()["workers"])
    assert rep.computed == ref.computed and rep.phase2_tasks == LAYERS
    records = stream.data
    assert len(records) == len(STEPS) * LAYERS + LAYERS  # (step, layer) tasks, then phase 2
    assert {r["worker"] for r in records} <= workers
    a, b = _metrics(threaded), _metrics(store)
    assert a.keys() == b.keys()
    for name in a:
        if a[name].dtype.kind == "f":
            np.testing.assert_allclose(b[name], a[name], rtol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def _float64_store(tmp_path, *, n=48, steps=6):
    """float64 weights with external activations: the stored Gram is float64."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    run, acts = tmp_path / "run64", tmp_path / "acts64"
    run.mkdir()
    acts.mkdir()
    W1, W2 = rng.standard_normal((9, 6)), rng.standard_normal((4, 9))
    for s in range(steps):
        W1 += 0.01 * rng.standard_normal(W1.shape)
        W2 += 0.01 * rng.standard_normal(W2.shape)
        save_file({"fc1.weight": W1, "fc2.weight": W2}, str(run / f"step_{3 * s:04d}.safetensors"))
        arrays = {
            f"{layer}/{what}": rng.standard_normal((n, d))
            for layer, d in (("fc1", 6), ("fc2", 9))
            for what in ("input", "input_grad")
        }
        np.savez(acts / f"step_{3 * s:04d}.npz", **arrays)
    np.savez(tmp_path / "p64.npz", inputs=rng.standard_normal((n, 2)), labels=rng.integers(0, 3, n))
    store = tmp_path / "s64.zarr"
    ga.ingest(run, store, activations=acts, probe=tmp_path / "p64.npz", lr=0.1)
    return store


def test_the_vc_chain_reuses_stored_float64_grams_to_the_bit(tmp_path):
    """With the Gram family in the run, phase 2 reads the stored float64 Grams
    instead of recomputing them; without it, it computes its own: the same bits."""
    store = _float64_store(tmp_path)
    alone = tmp_path / "alone.zarr"
    shutil.copytree(store, alone)
    assert zarr.open_group(str(store), mode="r")["layers/fc1/weight"].dtype == np.float64
    ga.analyze(store, metrics=["gram", "vc"])
    ga.analyze(alone, metrics=["vc"])
    with_grams, without = _metrics(store), _metrics(alone)
    assert with_grams["fc1/gram"].dtype == np.float64
    _assert_same_bits({k: with_grams[k] for k in without}, without)
