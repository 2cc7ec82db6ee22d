"""Records beside checkpoints: found by scan, stored by ingest, correlated by analyze.

The reference reads the record files and the checkpoints with safetensors' NumPy loader
and computes every Pearson correlation in float64 with ``np.corrcoef``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch import nn

import gramlin_analyze as ga
import gramlin_analyze.plot as gp
from gramlin_analyze.io.discovery import scan
from gramlin_analyze.record import Recorder
from gramlin_analyze.report import build_report, summary_frame
from gramlin_analyze.report.overview import overview
from gramlin_analyze.store.validate import validate_store
from tests.record.helpers import batches, mlp

LAYERS = ("0", "2", "4")


def _train(out: Path, *, every: int = 4, n: int = 12, drop: tuple[int, ...] = ()) -> None:
    """A seeded SGD run, a safetensors checkpoint and its record every ``every`` steps;
    layer 0 recorded ``full``, the others ``diag``; records of ``drop`` steps removed."""
    out.mkdir(parents=True)
    model = mlp((6, 8, 8, 3), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, opt, mode={"0": "full", "*": "diag"})

    def save(step: int) -> None:
        path = out / f"step_{step}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        rec.save(path)
        if step in drop:
            (out / f"step_{step}.gramlin_record.safetensors").unlink()

    save(0)
    for t, (x, y) in enumerate(batches(n, 16, 6, 3, seed=1), 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if t % every == 0:
            save(t)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    with np.errstate(invalid="ignore", divide="ignore"):  # step 0: a record of zeros
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _reference(run: Path, layer: str, steps: list[int]) -> dict[str, list[float]]:
    """The recorded metrics of ``layer`` at ``steps`` (all recorded), from the files."""
    recs = [load_file(str(run / f"step_{s}.gramlin_record.safetensors")) for s in steps]
    Ws = [load_file(str(run / f"step_{s}.safetensors"))[f"{layer}.weight"] for s in steps]
    full = recs[0][f"{layer}.vcs"].ndim == 2
    grams = [W.T @ W if full else np.sum(W * W, axis=0) for W in Ws]
    vcs = [r[f"{layer}.vcs"] for r in recs]
    first = [r[f"{layer}.vcs_first"] for r in recs]
    second = [r[f"{layer}.vcs_second"] for r in recs]
    diag = (lambda m: np.diag(m)) if full else (lambda v: v)
    out: dict[str, list[float]] = {
        k: [] for k in ("corr", "dcorr", "dfull", "icorr", "ratio", "share")
    }
    for k in range(len(steps)):
        out["corr"].append(_corr(diag(grams[k]), diag(vcs[k])))
        if k == 0:
            continue
        dg, dv = grams[k] - grams[0], vcs[k] - vcs[0]
        out["dcorr"].append(_corr(diag(dg), diag(dv)))
        out["dfull"].append(_corr(dg, dv) if full else np.nan)
        ig, iv = grams[k] - grams[k - 1], vcs[k] - vcs[k - 1]
        out["icorr"].append(_corr(ig, iv))
        out["ratio"].append(float(np.linalg.norm(iv) / np.linalg.norm(ig)))
        n1 = np.linalg.norm(first[k] - first[k - 1])
        n2 = np.linalg.norm(second[k] - second[k - 1])
        out["share"].append(float(n2 / (n1 + n2)))
    return out


def test_ingest_and_analyze_match_a_numpy_reference(tmp_path):
    run, store = tmp_path / "run", tmp_path / "s.zarr"
    _train(run, drop=(8,))
    report = ga.ingest(run, store)
    assert report.failed == {} and report.ingested == [0, 4, 8, 12]
    assert validate_store(store) == []
    areport = ga.analyze(store)
    assert sorted(areport.recorded_layers) == list(LAYERS)
    tree = ga.open(store)
    m = tree["metrics"].to_dataset().load()
    l0 = tree["layers/0"].to_dataset().load()
    assert l0["vcs_recorded"].dims == ("step", "in_i", "in_j")
    assert tree["layers/2"]["vcs_recorded"].dims == ("step", "in")
    assert tree["layers/2"]["vcs_recorded"].attrs["mode"] == "diag"
    # the checkpoint without a record: stored as none, never as zeros
    assert l0["steps_recorded"].values.tolist() == [0, 4, -1, 12]
    assert np.isnan(l0["vcs_recorded"].sel(step=8)).all()
    rec12 = load_file(str(run / "step_12.gramlin_record.safetensors"))
    np.testing.assert_array_equal(l0["vcs_recorded"].sel(step=12).values, rec12["0.vcs"])
    np.testing.assert_array_equal(l0["dgram_recorded"].sel(step=12).values, rec12["0.dgram"])
    assert float(l0["lr_sum_recorded"].sel(step=12)) == pytest.approx(12 * 0.1)
    for layer in LAYERS:
        ref = _reference(run, layer, [0, 4, 12])
        col = m.sel(layer=layer, step=[0, 4, 12])
        np.testing.assert_allclose(col["gram_vcs_recorded_corr"], ref["corr"], rtol=1e-10)
        got = col.sel(step=[4, 12])
        np.testing.assert_allclose(got["dgram_vcs_recorded_corr"], ref["dcorr"], rtol=1e-10)
        np.testing.assert_allclose(got["dgram_vcs_recorded_corr_full"], ref["dfull"], rtol=1e-10)
        np.testing.assert_allclose(got["vcs_recorded_interval_corr"], ref["icorr"], rtol=1e-10)
        np.testing.assert_allclose(got["vcs_recorded_interval_ratio"], ref["ratio"], rtol=1e-10)
        np.testing.assert_allclose(got["vcs_recorded_second_share"], ref["share"], rtol=1e-10)
        assert np.isnan(m["gram_vcs_recorded_corr"].sel(layer=layer, step=8))
    # plain SGD: the recorded interval VCS follows the Gram change closely
    assert float(m["vcs_recorded_interval_corr"].sel(layer="0", step=12)) > 0.99
    assert "recorded" in m["gram_vcs_recorded_corr"].attrs["vcs_source"]
    assert validate_store(store) == []
    src = gp.load(store)
    df = summary_frame(src)
    np.testing.assert_allclose(df["Gram~recVCS"], m["gram_vcs_recorded_corr"].sel(step=12))
    assert "dGram~recVCS" in df and "rec.interval" in df
    facts = dict(overview(src, str(store)).facts)
    assert facts["VCS sum"] == "recorded at every training step (3 layers)"
    html = Path(build_report(store).html).read_text()
    assert "Gram~recVCS" in html and "recorded at every training step" in html


def test_a_record_added_later_is_ingested_and_a_bad_one_fails_its_step(tmp_path):
    run, store = tmp_path / "run", tmp_path / "s.zarr"
    _train(run, n=8)
    kept = tmp_path / "rec4"
    shutil.move(run / "step_4.gramlin_record.safetensors", kept)
    ga.ingest(run, store)
    shutil.move(kept, run / "step_4.gramlin_record.safetensors")  # the record lands later
    (run / "step_8.gramlin_record.safetensors").write_bytes(b"not a record")
    report = ga.ingest(run, store)
    assert report.ingested == [4]
    assert list(report.failed) == [8] and "step_8.gramlin_record.safetensors" in report.failed[8]
    tree = ga.open(store)
    assert tree["layers/2"]["steps_recorded"].values.tolist()[:2] == [0, 4]
    assert validate_store(store) == []


def test_scan_attaches_records_of_hf_and_lightning_checkpoints(tmp_path):
    _train(tmp_path / "plain", n=4)
    record = tmp_path / "plain" / "step_4.gramlin_record.safetensors"
    weights = load_file(str(tmp_path / "plain" / "step_4.safetensors"))
    hf = tmp_path / "hf" / "checkpoint-4"
    hf.mkdir(parents=True)
    save_file({k: torch.from_numpy(v) for k, v in weights.items()}, str(hf / "model.safetensors"))
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    shutil.copy(record, hf / "gramlin_record.safetensors")
    pl = tmp_path / "pl"
    pl.mkdir()
    state = {"state_dict": {k: torch.from_numpy(v) for k, v in weights.items()}, "global_step": 4}
    torch.save(state, pl / "epoch=0-step=4.ckpt")
    shutil.copy(record, pl / "epoch=0-step=4.gramlin_record.safetensors")
    for root, fmt in ((tmp_path / "hf", "hf-trainer"), (pl, "lightning")):
        (src,) = scan(root)
        assert src.format == fmt and src.step == 4
        assert src.record is not None and src.record.name.endswith("gramlin_record.safetensors")
        assert src.record in src.files
    plain = scan(tmp_path / "plain")
    assert [s.record.name for s in plain] == [
        "step_0.gramlin_record.safetensors",
        "step_4.gramlin_record.safetensors",
    ]


def test_a_checkpoint_inserted_between_two_keeps_every_record_in_its_row(tmp_path):
    run, store, aside = tmp_path / "run", tmp_path / "s.zarr", tmp_path / "aside"
    _train(run, n=8)
    aside.mkdir()
    for name in ("step_4.safetensors", "step_4.gramlin_record.safetensors"):
        shutil.move(run / name, aside / name)
    ga.ingest(run, store)
    for name in ("step_4.safetensors", "step_4.gramlin_record.safetensors"):
        shutil.move(aside / name, run / name)
    assert ga.ingest(run, store).ingested == [4]
    assert validate_store(store) == []
    layer = ga.open(store)["layers/2"].to_dataset().load()
    assert layer["steps_recorded"].values.tolist() == [0, 4, 8]
    for step in (0, 4, 8):
        rec = load_file(str(run / f"step_{step}.gramlin_record.safetensors"))
        np.testing.assert_array_equal(layer["vcs_recorded"].sel(step=step), rec["2.vcs"])
        np.testing.assert_array_equal(
            layer["sgd_second_recorded"].sel(step=step), rec["2.sgd_second"]
        )
