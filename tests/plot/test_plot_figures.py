"""The plotting functions draw the store's values: every line's and image's data is
checked against the store read independently with xarray, on an MLP and a BERT-style
store (many layers, per-token rows, embeddings without activations)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import gramlin_analyze as ga
import gramlin_analyze.plot as gp
from gramlin_analyze.errors import MissingDataError
from tests.plot.stores import BERT_ORDER

matplotlib = pytest.importorskip("matplotlib")

EMBEDDINGS = BERT_ORDER[:3]
LAYER_LINES = [
    "tl_over_steps",
    "gram_vc_alignment",
    "rank_over_steps",
    "neural_collapse",
    "cka_to_final",
]


def metrics_of(store) -> xr.Dataset:
    return xr.open_datatree(str(store), engine="zarr")["metrics"].to_dataset().load()


def lines(fig) -> dict:
    return {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}


def images(fig) -> dict:
    return {im.get_gid(): im for ax in fig.axes for im in ax.get_images() if im.get_gid()}


def notes(fig) -> str:
    return " ".join(t.get_text() for t in fig.texts if t.get_gid() == "gramlin-notes")


def with_data(m: xr.Dataset, order: list[str], var: str) -> list[str]:
    finite = np.isfinite(m[var]).any("step")
    return [n for n in order if bool(finite.sel(layer=n))]


@pytest.fixture(scope="module", params=["mlp", "bert"])
def store(request):
    return request.getfixturevalue(f"{request.param}_store"), request.param


_DRAWN: dict = {}


def figure(path, name: str):
    """Each figure of each store drawn once for the module (drawing is what costs)."""
    key = (str(path), name)
    if key not in _DRAWN:
        _DRAWN[key] = next(s for s in gp.FIGURES if s.name == name).draw(gp.load(path))
    return _DRAWN[key]


def order_of(kind: str) -> list[str]:
    return ["0", "2", "4"] if kind == "mlp" else BERT_ORDER


def test_layers_are_ordered_by_depth_not_alphabetically(bert_store):
    assert gp.load(bert_store).layers == BERT_ORDER
    assert sorted(BERT_ORDER) != BERT_ORDER
    assert gp.depth_order(["fc10", "head", "fc2", "fc1"]) == ["fc1", "fc2", "fc10", "head"]


@pytest.mark.parametrize("name", LAYER_LINES)
def test_each_layer_line_is_the_store_values(store, name):
    path, kind = store
    m = metrics_of(path)
    fig = figure(path, name)
    drawn = {gid: ln for gid, ln in lines(fig).items() if "|step=" not in gid}
    assert drawn
    for gid, line in drawn.items():
        var, layer = gid.split("|")
        np.testing.assert_array_equal(line.get_xdata(), m["step"].values)
        np.testing.assert_array_equal(line.get_ydata(), m[var].sel(layer=layer).values)
    variables = {gid.split("|")[0] for gid in drawn} - {"tl_null"}
    have = {n for v in variables for n in with_data(m, order_of(kind), v)}
    assert {gid.split("|")[1] for gid in drawn} == have
    for name in set(order_of(kind)) - have:  # embeddings have no activations: skipped, with a note
        assert name in notes(fig)


def test_tl_over_steps_has_each_layers_own_null(bert_store):
    m = metrics_of(bert_store)
    drawn = lines(figure(bert_store, "tl_over_steps"))
    have = with_data(m, BERT_ORDER, "target_linearity")
    assert {g for g in drawn if g.startswith("tl_null|")} == {f"tl_null|{n}" for n in have}
    nulls = {float(drawn[f"tl_null|{n}"].get_ydata()[-1]) for n in have}
    assert len(nulls) > 1  # per-token and per-sequence layers differ: no single max line


def test_tl_vs_depth_lines_follow_depth(store):
    path, kind = store
    m = metrics_of(path)
    have = with_data(m, order_of(kind), "target_linearity")
    fig = figure(path, "tl_vs_depth")
    steps = m["step"].values
    for step in (steps[0], steps[len(steps) // 2], steps[-1]):
        line = lines(fig)[f"target_linearity|step={step}"]
        np.testing.assert_array_equal(
            line.get_ydata(), m["target_linearity"].sel(step=step, layer=have).values
        )
        np.testing.assert_array_equal(line.get_xdata(), np.arange(len(have)))
    null = lines(fig)[f"tl_null|step={steps[-1]}"]
    np.testing.assert_array_equal(
        null.get_ydata(), m["tl_null"].sel(step=steps[-1], layer=have).values
    )


def test_tl_heatmap_image_is_layer_by_step(store):
    path, kind = store
    m = metrics_of(path)
    have = with_data(m, order_of(kind), "target_linearity")
    image = images(figure(path, "tl_heatmap"))["target_linearity"]
    expected = m["target_linearity"].sel(layer=have).transpose("layer", "step").values
    np.testing.assert_array_equal(np.ma.getdata(image.get_array()), expected)


def test_interval_consistency_image_is_layer_by_interval(store):
    path, kind = store
    m = metrics_of(path)
    have = with_data(m, order_of(kind), "vcs_interval_corr")
    steps = m["step"].values
    for var in ("vcs_interval_corr", "vcs_interval_ratio"):
        fig = figure(path, "interval_consistency") if var == "vcs_interval_corr" else None
        image = images(fig or gp.interval_consistency(path, variable=var))[var]
        expected = m[var].sel(layer=have, step=steps[1:]).transpose("layer", "step").values
        np.testing.assert_array_equal(np.ma.getdata(image.get_array()), expected)


def test_alignment_by_layer_at_the_last_step(mlp_store):
    m = metrics_of(mlp_store)
    last = int(m["step"][-1])
    drawn = lines(figure(mlp_store, "alignment_by_layer"))
    for var in ("gram_vc_corr", "gram_vcs_acc_corr", "nfa_corr"):  # the MLP store has AGOP
        np.testing.assert_array_equal(
            drawn[f"{var}|step={last}"].get_ydata(),
            m[var].sel(step=last, layer=["0", "2", "4"]).values,
        )


@pytest.mark.parametrize("opened", [False, True], ids=["path", "datatree"])
def test_gram_vs_vcs_scatter_is_the_diagonals(bert_store, opened):
    tree = xr.open_datatree(str(bert_store), engine="zarr")
    steps = tree["metrics"]["step"].values
    if opened:  # matrices through a DataTree, every layer
        fig = gp.gram_vs_vcs(ga.open(bert_store), max_panels=20)
    else:  # at most 12 panels by default, spread over depth, and the note says so
        fig = figure(bert_store, "gram_vs_vcs")
        assert "Showing 12 of 14 layers" in notes(fig)
    dots = {c.get_gid(): c for ax in fig.axes for c in ax.collections if c.get_gid()}
    drawn = [g.split("|")[1] for g in dots]
    assert set(drawn) <= set(BERT_ORDER[3:]) and len(drawn) == (14 if opened else 12)
    assert drawn[0] == BERT_ORDER[3] and drawn[-1] == "classifier"
    for gid, scatter in dots.items():
        ds = tree[f"metrics/{gid.split('|')[1]}"]
        gram = ds["gram"].values.astype(np.float64)
        x = np.diagonal(ds["vcs_accumulated"].sel(step=steps[-1]).values)
        y = np.diagonal(gram[-1]) - np.diagonal(gram[0])
        np.testing.assert_allclose(scatter.get_offsets(), np.column_stack([x, y]), rtol=1e-12)


def test_spectra_lines_are_the_stored_eigenvalues(mlp_store):
    tree = xr.open_datatree(str(mlp_store), engine="zarr")
    steps = tree["metrics"]["step"].values
    drawn = lines(figure(mlp_store, "spectra"))
    for layer in ("0", "2", "4"):
        for step in (steps[0], steps[len(steps) // 2], steps[-1]):
            expected = tree[f"metrics/{layer}"]["spectrum"].sel(step=step).values
            np.testing.assert_array_equal(
                drawn[f"spectrum|{layer}|step={step}"].get_ydata(), expected
            )


def test_steps_not_ok_are_not_drawn(mlp_store):
    tree = xr.open_datatree(str(mlp_store), engine="zarr").load()
    steps = tree["steps"].to_dataset()
    status = steps["status"].values.astype(object)
    status[1] = "failed"
    edited = xr.DataTree.from_dict(
        {
            "/": xr.Dataset(attrs=dict(tree.attrs)),
            "/steps": steps.assign(status=("step", status)),
            "/metrics": tree["metrics"].to_dataset(),
        }
    )
    line = lines(gp.tl_over_steps(edited))["target_linearity|2"]
    stored = tree["metrics"]["target_linearity"].sel(layer="2").values
    assert np.isfinite(stored[1]) and np.isnan(line.get_ydata()[1])
    np.testing.assert_array_equal(np.delete(line.get_ydata(), 1), np.delete(stored, 1))


def test_layers_select_by_glob_and_keep_a_given_order(bert_store):
    picked = lines(gp.tl_over_steps(bert_store, layers=["bert.encoder.layer.1*"]))
    assert {g.split("|")[1] for g in picked} == {
        n for n in BERT_ORDER if n.startswith("bert.encoder.layer.1")
    }
    fig = gp.tl_vs_depth(bert_store, layers=["classifier", "bert.pooler.dense"])
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["classifier", "bert.pooler.dense"]
    with pytest.raises(ValueError, match="no layer matches 'nope'"):
        gp.tl_over_steps(bert_store, layers=["nope"])


def test_a_metric_no_layer_has_says_how_to_get_it(mlp_store):
    metrics = metrics_of(mlp_store).drop_vars(["target_linearity", "tl_null"])
    with pytest.raises(MissingDataError, match="analyze STORE --metrics tl"):
        gp.tl_over_steps(metrics)


def _boxes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # as a reader sees it
    renderer = canvas.get_renderer()
    axes = [ax.get_window_extent(renderer) for ax in fig.axes]
    axes_with_labels = [ax.get_tightbbox(renderer) for ax in fig.axes]
    legends = [lg.get_window_extent(renderer) for lg in fig.legends]
    legends += [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_legend()]
    texts = [t.get_window_extent(renderer) for t in fig.texts]
    return axes, legends, texts + axes_with_labels


WITH_KEYS = ["gram_vc_alignment", "rank_over_steps", "neural_collapse", "cka_to_final"]


@pytest.mark.parametrize(
    "kind, name",
    [("bert", s.name) for s in gp.FIGURES] + [("mlp", n) for n in WITH_KEYS],  # colorbars, legends
)
def test_no_legend_or_note_covers_a_panel(request, kind, name):
    fig = figure(request.getfixturevalue(f"{kind}_store"), name)
    axes, legends, texts = _boxes(fig)
    for box in legends + texts[: len(texts) - len(axes)]:
        assert not any(box.overlaps(ax) for ax in axes), (name, box)
    width, height = fig.get_size_inches() * fig.dpi
    for box in legends + texts:  # inside the figure: nothing cut off, tick labels included
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1


def test_depth_colors_read_in_grayscale():
    from gramlin_analyze.plot._style import depth_colors

    rgb = np.array(depth_colors(12))[:, :3]
    luminance = rgb @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(luminance) > 0)  # shallow dark to deep light, without hue
