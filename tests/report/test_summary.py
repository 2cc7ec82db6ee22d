"""``gramlin-analyze summary``: the per-layer table for any store, and tidy exports of
/metrics that round-trip into pandas with the stored values."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from gramlin_analyze.cli import main
from tests.plot.stores import BERT_ORDER


def stored(store) -> xr.Dataset:
    return xr.open_datatree(str(store), engine="zarr")["metrics"].to_dataset().load()


def test_csv_round_trips_with_the_values_of_metrics(mlp_store, tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert main(["summary", str(mlp_store), "--csv", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    df = pd.read_csv(out, dtype={"layer": str})  # layer names such as "0" stay names
    m = stored(mlp_store)
    assert list(df.columns[:3]) == ["step", "layer", "status"]
    assert set(df.columns[3:]) == set(m.data_vars)
    assert len(df) == m.sizes["step"] * m.sizes["layer"] and set(df["status"]) == {"ok"}
    layers = [str(v) for v in m["layer"].values]
    for var in m.data_vars:
        got = df.pivot(index="step", columns="layer", values=var).loc[m["step"].values, layers]
        np.testing.assert_array_equal(got.to_numpy(), m[var].values)


def test_parquet_export(mlp_store, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "m.parquet"
    assert main(["summary", str(mlp_store), "--csv", str(out), "-q"]) == 0
    df = pd.read_parquet(out)
    m = stored(mlp_store)
    row = df[(df["step"] == int(m["step"][-1])) & (df["layer"] == "4")].iloc[0]
    assert row["target_linearity"] == float(m["target_linearity"].isel(step=-1).sel(layer="4"))


def test_table_lists_layers_by_depth_with_whole_names(bert_store, capsys):
    assert main(["summary", str(bert_store)]) == 0
    text = capsys.readouterr().out
    head, rule, *rows = text.split("\n\n")[1].splitlines()
    assert [r.split()[0] for r in rows] == BERT_ORDER
    assert len({len(head), len(rule), *map(len, rows)}) == 1  # aligned
    m = stored(bert_store).isel(step=-1)
    assert head.split()[3] == "TL"  # "layer input of", then the metrics
    for row in rows:
        cells = row.split()
        value = float(m["target_linearity"].sel(layer=cells[0]))
        assert cells[1] == ("-" if np.isnan(value) else f"{value:.3f}")


def test_json_table_at_a_step(mlp_store, capsys):
    m = stored(mlp_store)
    step = int(m["step"][1])
    assert main(["summary", str(mlp_store), "--step", str(step), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["step"] == step and [r["layer"] for r in doc["layers"]] == ["0", "2", "4"]
    for row in doc["layers"]:
        assert row["TL"] == float(m["target_linearity"].sel(step=step, layer=row["layer"]))
        assert row["Gram~AGOP"] == float(m["nfa_corr"].sel(step=step, layer=row["layer"]))
