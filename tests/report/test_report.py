"""``gramlin-analyze report``: one self-contained HTML page of every figure the store has
data for, PNG/SVG exports, made from /metrics, /steps and attributes alone; and the
page as a person sees it, in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from gramlin_analyze.cli import main
from tests.report.browser import chromium, load_page

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

FIGURES = 11  # every figure of the registry: both test stores have data for all of them
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="(\d+)" height="(\d+)"')


def non_blank(png: bytes) -> bool:
    """Drawn on: axes, ticks, labels and data leave thousands of dark pixels."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    return int(np.count_nonzero(pixels < 160)) > 2000


@pytest.fixture(scope="module")
def report(mlp_store, tmp_path_factory):
    """The report of the MLP store, made from a copy without /layers and /probe: the
    report must need nothing but /metrics, /steps and the attributes."""
    work = tmp_path_factory.mktemp("report")
    store = work / "mlp.zarr"
    shutil.copytree(mlp_store, store)
    shutil.rmtree(store / "layers")
    shutil.rmtree(store / "probe")
    html, png = work / "mlp.html", work / "figures"
    assert main(["report", str(store), "-o", str(html), "--png", str(png), "-q"]) == 0
    return html, png


def assert_self_contained(text: str, figures: int) -> None:
    """Nothing fetched from outside the page; ``figures`` embedded, drawn-on PNGs of the
    size their ``<img>`` says."""
    assert not re.search(r"https?://", text)
    for outside in ("<script", "<link", "@import", "url(", "@font-face", "<iframe"):
        assert outside not in text.lower()
    embedded = IMG.findall(text)
    assert len(embedded) == figures == len(re.findall(r"<img ", text))
    for data, width, height in embedded:
        png = base64.b64decode(data)
        assert Image.open(io.BytesIO(png)).size == (int(width), int(height))
        assert non_blank(png)


def test_report_is_one_self_contained_page(report):
    html, _ = report
    text = html.read_text(encoding="utf-8")
    assert_self_contained(text, FIGURES)
    for part in ("Run summary", "3 ok", "Per layer at the last step (step 8)", "Gram~AGOP"):
        assert part in text
    assert '<ul class="warnings">' not in text  # no warning, every figure drawn


def test_png_files_are_the_embedded_figures(report):
    html, png_dir = report
    embedded = [base64.b64decode(d) for d, _, _ in IMG.findall(html.read_text())]
    pngs = sorted(png_dir.glob("*.png"))
    assert len(pngs) == FIGURES
    assert {p.read_bytes() for p in pngs} == set(embedded)


def test_svg_beside_the_png(mlp_store, tmp_path):
    import gramlin_analyze.plot as gp
    from gramlin_analyze.report.build import _render, exporter

    fig = gp.tl_heatmap(mlp_store)
    png = _render(fig, "png")
    written = exporter(tmp_path, True)("tl_heatmap", fig, png)
    assert [p.name for p in written] == ["tl_heatmap.png", "tl_heatmap.svg"]
    assert written[0].read_bytes() == png
    root = ET.parse(written[1]).getroot()
    assert root.tag.endswith("svg") and "target_linearity" in written[1].read_text()  # the gid


@pytest.mark.slow
def test_two_processes_draw_the_same_report(report, tmp_path):
    """The helper process draws half the figures, byte for byte as one process draws
    them all; in reading order, with the same files."""
    from gramlin_analyze.plot._registry import FIGURES as SPECS
    from gramlin_analyze.report.build import build_report

    html, png_dir = report
    store = html.parent / "mlp.zarr"
    result = build_report(store, tmp_path / "two.html", png_dir=tmp_path / "png", processes=2)
    assert [p.name for p in result.files] == [f"{s.name}.png" for s in SPECS]
    for p in result.files:
        assert p.read_bytes() == (png_dir / p.name).read_bytes(), p.name
    one, two = (IMG.findall(h.read_text()) for h in (html, tmp_path / "two.html"))
    assert one == two and len(two) == FIGURES


@pytest.mark.slow
def test_a_helper_that_dies_leaves_its_figures_to_the_parent(report):
    """A helper killed before it answers: the parent draws its figures too."""
    from gramlin_analyze.plot._source import load
    from gramlin_analyze.report.build import _draw_all
    from gramlin_analyze.report.parallel import Helper, Job

    html, png_dir = report
    store = str(html.parent / "mlp.zarr")
    job = Job(store, None, None, None, False)
    helper = Helper.start(job)
    helper.process.kill()
    helper.process.wait()
    try:
        drawn, files, missing = _draw_all(load(store), job, helper, None)
    finally:
        helper.close()
    assert not files and not missing
    assert [f.png for f in drawn] == [
        base64.b64decode(d) for d, _, _ in IMG.findall(html.read_text())
    ]


def test_report_of_a_store_without_metrics_says_what_to_run(tmp_path, capsys):
    import gramlin_analyze as ga
    from tests.trajectory import write_trajectory

    write_trajectory(tmp_path / "run", [0, 1])
    ga.ingest(tmp_path / "run", tmp_path / "w.zarr")
    assert main(["report", str(tmp_path / "w.zarr")]) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith("w.report.html")
    assert f"no /metrics: run gramlin-analyze analyze {tmp_path / 'w.zarr'}" in out.err
    page = (tmp_path / "w.report.html").read_text()
    assert "<img" not in page and "no /metrics" in page
    assert main(["summary", str(tmp_path / "w.zarr")]) == 2
    assert "run gramlin-analyze analyze" in capsys.readouterr().err


def test_bad_usage_is_one_line_and_exit_2(tmp_path, capsys, mlp_store):
    cases = [
        (["report", str(tmp_path / "missing.zarr")], "missing.zarr"),
        (["report", str(mlp_store), "--svg"], "--png DIR"),
        (["report", str(tmp_path)], "not a gramlin-analyze store"),
        (["summary", str(mlp_store), "--step", "4"], "step 4 is not an ok step"),
        (["summary", str(mlp_store), "--format", "parquet"], "--csv FILE"),
        (["summary", str(mlp_store), "--layers", "nope*"], "no layer matches"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and says in err, (argv, err)


def check_in_browser(html, tmp_path, shot_name: str):
    """Open ``html`` in headless Chromium (skip without it): local requests only, no
    errors, every image loaded and drawn on in the screenshot, saved as the test's
    artifact (what a reader sees). Returns the page."""
    if chromium() is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)"
        )
    page = load_page(html, tmp_path / "profile")
    shot = tmp_path / shot_name
    shot.write_bytes(page.screenshot)
    assert page.requests[0] == html.resolve().as_uri()
    assert all(u.startswith(("file:", "data:")) for u in page.requests), page.requests
    assert not page.failed, page.failed
    assert not page.console_errors, page.console_errors
    screenshot = Image.open(shot).convert("L")
    for img in page.images:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
        box = (img["x"], img["y"], img["x"] + img["bw"], img["y"] + img["bh"])
        region = io.BytesIO()
        screenshot.crop(tuple(round(v) for v in box)).save(region, format="PNG")
        assert non_blank(region.getvalue()), img["figure"]
    return page


@pytest.mark.slow
def test_the_page_in_a_real_browser(report, tmp_path):
    html, _ = report
    page = check_in_browser(html, tmp_path, "report-screenshot.png")
    assert len(page.images) == FIGURES
