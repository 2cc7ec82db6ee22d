"""``report`` and ``summary`` of several stores: one comparison page, one table with a
``run`` column, exports with a ``run`` column; the page as a person sees it in Chromium."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from gramlin_analyze.cli import main
from tests.report.test_report import assert_self_contained, check_in_browser
from tests.runs.stores import SWEEP, metrics_of

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

NAMES = [f"p{p}-s{s}" for p, s, _ in SWEEP]


@pytest.fixture(scope="module")
def comparison(noise_sweep, tmp_path_factory):
    """The comparison report of the label-noise sweep, from a glob of its stores."""
    work = tmp_path_factory.mktemp("compare")
    html, png = work / "sweep.html", work / "figures"
    pattern = str(noise_sweep[0].parent / "run*.zarr")
    argv = ["report", pattern, "-o", str(html), "--png", str(png), "--gap", "0", "4", "-q"]
    assert main(argv) == 0
    return html, png


def test_comparison_page_is_self_contained(comparison):
    html, png_dir = comparison
    text = html.read_text(encoding="utf-8")
    assert_self_contained(text, 3)
    assert {p.name for p in png_dir.glob("*.png")} == {
        "runs_tl_over_steps.png",
        "final_tl_by.png",
        "tl_gap_by.png",
    }
    # --by defaults to the one attribute besides seed that differs: label_noise
    assert "Final target linearity against label_noise" in text
    assert '<ul class="warnings">' not in text
    for name in NAMES:
        assert f"<th>{name}</th>" in text  # a fact row per run


def test_comparison_table_has_each_runs_values(comparison, noise_sweep):
    text = comparison[0].read_text(encoding="utf-8")
    rows = re.findall(
        r'<tr><td class="name">([^<]+)</td><td class="name">([^<]+)</td>'
        r'<td class="num">(\d+)</td><td class="num">([^<]+)</td>',
        text,
    )
    assert len(rows) == 4 * 3
    for store, name in zip(noise_sweep, NAMES, strict=True):
        tl = metrics_of(store)["target_linearity"].isel(step=-1)
        for run, layer, step, value in rows:
            if run == name:
                assert int(step) == 8
                assert value == f"{float(tl.sel(layer=layer)):.3f}"


def test_summary_of_several_stores_is_one_table(noise_sweep, capsys, tmp_path):
    stores = [str(s) for s in noise_sweep]
    assert main(["summary", *stores, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["stores"] == dict(zip(NAMES, stores, strict=True))
    assert [r["run"] for r in doc["rows"]] == [n for n in NAMES for _ in range(3)]
    for store, name in zip(noise_sweep, NAMES, strict=True):
        tl = metrics_of(store)["target_linearity"].isel(step=-1)
        for row in (r for r in doc["rows"] if r["run"] == name):
            assert row["step"] == 8 and row["TL"] == float(tl.sel(layer=row["layer"]))
    assert main(["summary", *stores[:2]]) == 0
    lines = capsys.readouterr().out.split("\n\n")[1].splitlines()
    assert lines[0].split()[:5] == ["run", "layer", "input", "of", "step"]
    assert [r.split()[:2] for r in lines[2:]] == [[n, layer] for n in NAMES[:2] for layer in "024"]


def test_export_of_several_stores_has_a_run_column(noise_sweep, tmp_path):
    out = tmp_path / "all.csv"
    assert main(["summary", *map(str, noise_sweep[:2]), "--csv", str(out), "-q"]) == 0
    df = pd.read_csv(out, dtype={"layer": str})
    assert list(df.columns[:5]) == ["run", "store", "step", "layer", "status"]
    for store, name in zip(noise_sweep[:2], NAMES[:2], strict=True):
        m = metrics_of(store)
        got = df[df["run"] == name].pivot(index="step", columns="layer", values="target_linearity")
        np.testing.assert_array_equal(
            got.loc[m["step"].values, ["0", "2", "4"]].to_numpy(),
            m["target_linearity"].sel(layer=["0", "2", "4"]).values,
        )


def test_comparison_usage_errors(noise_sweep, mlp_store, tmp_path, capsys):
    cases = [
        (["report", str(mlp_store), "--by", "seed"], "give several stores"),
        (["report", *map(str, noise_sweep), "--by", "lr"], "no run attribute 'lr'"),
        (["report", str(tmp_path / "none*.zarr")], "no store matches"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and says in err, (argv, err)


@pytest.mark.slow
def test_the_comparison_page_in_a_real_browser(comparison, tmp_path):
    html, _ = comparison
    page = check_in_browser(html, tmp_path, "comparison-screenshot.png")
    assert [img["figure"] for img in page.images] == [
        "runs_tl_over_steps",
        "final_tl_by",
        "tl_gap_by",
    ]
