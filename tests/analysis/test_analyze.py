"""analyze over a real store: values vs independent float64 NumPy, incremental, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

import gramlin_analyze as ga
from gramlin_analyze.capture.task import CaptureConfig
from gramlin_analyze.cli import main
from gramlin_analyze.errors import MissingDataError

FACTORY = "tests.capture_models:build_mlp"
LR = 0.05


def _run(tmp_path, steps, *, n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)).astype(np.float32)
    y = rng.integers(0, 3, n)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(max(steps) + 1):
        if step in steps:
            torch.save(model.state_dict(), run / f"step_{step:04d}.pt")
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    np.savez(tmp_path / "probe.npz", inputs=x, labels=y)
    return run, x, y


def _ingest(tmp_path, run, **kw):
    cfg = CaptureConfig(probe=str(tmp_path / "probe.npz"), model=FACTORY, batch_size=16)
    return ga.ingest(run, tmp_path / "s.zarr", capture=cfg, lr=LR, **kw)


# -- independent references (textbook formulas on full matrices) -----------------------


def ref_pearson(a, b, diag):
    if diag:
        a, b = np.diag(a), np.diag(b)
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


def ref_tl(H, Y):
    Yc = Y - Y.mean(axis=0)
    B, *_ = np.linalg.lstsq(H, Yc, rcond=None)
    return 1 - np.sum((Yc - H @ B) ** 2) / np.sum(Yc**2)


def ref_nc1(H, labels, C):
    mu_g = H.mean(axis=0)
    mus = np.stack([H[labels == c].mean(axis=0) for c in range(C)])
    Sw = sum(np.outer(h - mus[c], h - mus[c]) for h, c in zip(H, labels, strict=True)) / len(H)
    Sb = sum(np.outer(m - mu_g, m - mu_g) for m in mus) / C
    return np.trace(Sw @ np.linalg.pinv(Sb)) / C


def ref_cka(X, Y):
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def test_metrics_match_independent_reference(tmp_path):
    run, x, y = _run(tmp_path, [0, 2, 5, 9])
    assert not _ingest(tmp_path, run).failed
    report = ga.analyze(tmp_path / "s.zarr")
    assert set(report.families) == {"gram", "spectrum", "vc", "tl", "nc", "cka"}
    assert "nfa" in report.unavailable and "--capture-agop" in report.unavailable["nfa"]
    tree = xr.open_datatree(str(tmp_path / "s.zarr"), engine="zarr")
    m = tree["metrics"].to_dataset()
    steps = tree["steps"]["step"].values
    Y = np.eye(3)[y]
    for layer in ("0", "2", "4"):
        ds = tree[f"layers/{layer}"]
        W = ds["weight"].values.astype(np.float64)
        H = ds["input"].values.astype(np.float64)
        Gd = ds["input_grad"].values.astype(np.float64)
        acc = np.zeros((W.shape[2], W.shape[2]))
        for t, step in enumerate(steps):
            row = m.sel(step=step, layer=layer)
            gram = W[t].T @ W[t]
            ev = np.clip(np.linalg.eigvalsh(gram), 0, None)
            p = ev[ev > 0] / ev.sum()
            np.testing.assert_allclose(
                row["effective_rank"], np.exp(-(p * np.log(p)).sum()), rtol=1e-9
            )
            np.testing.assert_allclose(
                row["stable_rank"], np.sum(W[t] ** 2) / np.linalg.norm(W[t], 2) ** 2, rtol=1e-9
            )
            np.testing.assert_allclose(row["fro_norm"], np.sqrt(np.sum(W[t] ** 2)), rtol=1e-12)
            np.testing.assert_allclose(
                row["spectral_norm"], np.linalg.svd(W[t], compute_uv=False)[0], rtol=1e-9
            )
            if t > 0:  # from the stored (float32) Grams, so float32 tolerance
                prev = W[t - 1].T @ W[t - 1]
                ref = np.sqrt(np.sum((gram - prev) ** 2)) / np.sqrt(np.sum(prev**2))
                np.testing.assert_allclose(row["gram_change"], ref, rtol=1e-4)
            else:
                assert np.isnan(row["gram_change"])
            hp = H[t] - LR * Gd[t]
            vc = np.einsum("ni,nj->ij", hp, hp)
            vcs = vc - np.einsum("ni,nj->ij", H[t], H[t])
            np.testing.assert_allclose(
                tree[f"metrics/{layer}"]["vc"].sel(step=step), vc, rtol=1e-9, atol=1e-12
            )
            np.testing.assert_allclose(row["gram_vc_corr"], ref_pearson(gram, vc, True), rtol=1e-9)
            np.testing.assert_allclose(
                row["gram_vc_corr_full"], ref_pearson(gram, vc, False), rtol=1e-9
            )
            np.testing.assert_allclose(row["target_linearity"], ref_tl(H[t], Y), rtol=1e-8)
            np.testing.assert_allclose(row["tl_null"], min(1, H.shape[2] / H.shape[1]))
            np.testing.assert_allclose(row["nc1"], ref_nc1(H[t], y, 3), rtol=1e-8)
            np.testing.assert_allclose(row["cka_to_final"], ref_cka(H[t], H[-1]), rtol=1e-9)
            if t > 0:
                a = t - 1
                gap = steps[t] - steps[a]
                vcs_a = np.einsum("ni,nj->ij", H[a] - LR * Gd[a], H[a] - LR * Gd[a]) - np.einsum(
                    "ni,nj->ij", H[a], H[a]
                )
                pred = gap * (vcs_a + vcs) / 2
                acc = acc + pred
                dG = gram - W[a].T @ W[a]
                np.testing.assert_allclose(
                    row["vcs_interval_corr"], ref_pearson(dG, pred, False), rtol=1e-9
                )
                np.testing.assert_allclose(
                    row["vcs_interval_ratio"], np.linalg.norm(pred) / np.linalg.norm(dG), rtol=1e-9
                )
                np.testing.assert_allclose(
                    row["fle_residual"],
                    np.linalg.norm(dG - gap * vcs_a) / np.linalg.norm(dG),
                    rtol=1e-9,
                )
                np.testing.assert_allclose(
                    row["gram_vcs_acc_corr"],
                    ref_pearson(gram - W[0].T @ W[0], acc, True),
                    rtol=1e-9,
                )
            else:
                assert np.isnan(row["vcs_interval_corr"])
        # NC3/NC4 only for the readout (d_out = C = 3).
        assert (
            np.isfinite(m["nc3"].sel(layer="4")).all() and np.isnan(m["nc3"].sel(layer="0")).all()
        )


def test_incremental_and_recompute(tmp_path):
    run, x, y = _run(tmp_path, [0, 2, 4, 6])
    (run / "step_0006.pt").rename(tmp_path / "later.pt")
    _ingest(tmp_path, run)
    first = ga.analyze(tmp_path / "s.zarr", metrics=["gram", "tl"])
    assert first.computed == 3 * 3 * 2
    before = ga.open(tmp_path / "s.zarr")["metrics"]["target_linearity"].load()
    again = ga.analyze(tmp_path / "s.zarr", metrics=["gram", "tl"])
    assert again.computed == 0 and again.up_to_date == 18
    (tmp_path / "later.pt").rename(run / "step_0006.pt")
    assert ga.ingest(run, tmp_path / "s.zarr").ingested == [6]
    third = ga.analyze(tmp_path / "s.zarr", metrics=["gram", "tl"])
    assert third.computed == 3 * 2  # only the new step's (layer, family) pairs
    after = ga.open(tmp_path / "s.zarr")["metrics"]["target_linearity"].load()
    xr.testing.assert_equal(after.sel(step=[0, 2, 4]), before)
    assert np.isfinite(after.sel(step=6)).all()
    assert ga.analyze(tmp_path / "s.zarr", metrics=["gram", "tl"], recompute=True).computed == 24


def test_failed_steps_are_skipped_never_read(tmp_path):
    run, x, y = _run(tmp_path, [0, 1, 2])
    (run / "step_0003.pt").write_bytes(b"not a checkpoint")
    report = _ingest(tmp_path, run)
    assert list(report.failed) == [3]
    res = ga.analyze(tmp_path / "s.zarr", metrics=["gram", "spectrum"])
    assert res.skipped_steps == {3: "failed"}
    m = ga.open(tmp_path / "s.zarr")["metrics"]
    assert np.isnan(m["effective_rank"].sel(step=3)).all()
    assert np.isfinite(m["effective_rank"].sel(step=[0, 1, 2])).all()


def test_missing_data_names_the_command(tmp_path, capsys):
    run, x, y = _run(tmp_path, [0, 1])
    ga.ingest(run, tmp_path / "w.zarr")
    with pytest.raises(MissingDataError, match="--probe"):
        ga.analyze(tmp_path / "w.zarr", metrics=["target_linearity"])
    assert main(["analyze", str(tmp_path / "w.zarr"), "--metrics", "nc", "-q"]) == 2
    err = capsys.readouterr().err
    assert "gramlin-analyze ingest" in err and len(err.strip().splitlines()) == 1
    assert main(["analyze", str(tmp_path / "w.zarr"), "-q"]) == 0  # gram only; the rest listed


def test_nan_inputs_give_flagged_nan(tmp_path):
    run, x, y = _run(tmp_path, [0, 1, 2])
    sd = torch.load(run / "step_0001.pt", weights_only=True)
    sd["2.weight"][0, 0] = float("inf")
    torch.save(sd, run / "step_0001.pt")
    ga.ingest(run, tmp_path / "s.zarr")
    rep = ga.analyze(tmp_path / "s.zarr", metrics=["spectrum"])
    assert (1, "2") in rep.nonfinite
    m = ga.open(tmp_path / "s.zarr")["metrics"]
    assert np.isnan(m["effective_rank"].sel(step=1, layer="2"))
    assert np.isfinite(m["effective_rank"].sel(step=1, layer="0"))


def test_local_cluster_matches_threads(tmp_path):
    run, x, y = _run(tmp_path, [0, 3])
    _ingest(tmp_path, run)
    ga.analyze(tmp_path / "s.zarr", metrics=["gram", "tl"])
    a = ga.open(tmp_path / "s.zarr")["metrics"].to_dataset().load()
    ga.analyze(tmp_path / "s.zarr", metrics=["gram", "tl"], recompute=True, workers=2)
    b = ga.open(tmp_path / "s.zarr")["metrics"].to_dataset().load()
    xr.testing.assert_allclose(a, b, rtol=1e-12)
