"""A Lightning CNN on digits: trained, checkpointed by ModelCheckpoint, ingested with capture,
analyzed. Weights must be the module's own, bit for bit, in ``(out, in)``; TL per image (the
paper's conv convention: unfolded patches flattened per image) and the surrogate must match a
float64 NumPy re-implementation of the paper's code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

pl = pytest.importorskip("lightning.pytorch")
datasets = pytest.importorskip("sklearn.datasets")

import gramlin_analyze as ga  # noqa: E402
from gramlin_analyze.capture.task import CaptureConfig  # noqa: E402
from tests.lightning_cnn.cnn_model import DigitsCNN  # noqa: E402
from tests.paper_reference import regression_r2  # noqa: E402

N_PROBE, C = 600, 10


class LitCNN(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = DigitsCNN()

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def unfold_per_image(X, conv):
    """The paper's ``model.unfold(X).view(N, -1)``: every position's patch, flattened per image."""
    cols = torch.nn.functional.unfold(
        torch.from_numpy(X), conv.kernel_size, padding=conv.padding, stride=conv.stride
    )
    return cols.reshape(cols.shape[0], -1).numpy().astype(np.float64)  # (N, C_in k k L)


def paper_tl(H, labels):
    Y = np.eye(C)[labels]
    Y = Y - Y.mean(axis=0)
    if H.shape[1] > 1000:  # the paper's PCA, exact, on the axes of nonzero variance
        _, sv, vt = np.linalg.svd(H - H.mean(axis=0), full_matrices=False)
        keep = sv[:256] ** 2 > 10 * H.shape[1] * np.finfo(float).eps * sv[0] ** 2
        H = H @ vt[:256][keep].T
    return regression_r2(H, Y)


def paper_surrogate(cols, W, labels):
    """``Z = X^T W^T`` per image flattened, then ``mean(diag(Y^T Z Z^T Y))``."""
    Y = np.eye(C)[labels]
    Y = Y - Y.mean(axis=0)
    n = cols.shape[0]
    X = cols.reshape(n, W.shape[1], -1)  # (N, C_in k k, L)
    Z = (np.swapaxes(X, 1, 2) @ W.T).reshape(n, -1)
    return float(np.mean(np.sum((Z.T @ Y) ** 2, axis=0)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnn")
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=64,
        shuffle=False,
    )
    run = tmp / "run"
    ckpt = pl.callbacks.ModelCheckpoint(run, every_n_train_steps=3, save_top_k=-1)
    states = {}

    class Keep(pl.Callback):  # the module's own state_dict() at each saved step
        def on_save_checkpoint(self, trainer, module, checkpoint):
            states[trainer.global_step] = {
                k: v.detach().clone() for k, v in module.model.state_dict().items()
            }

    trainer = pl.Trainer(
        max_steps=6,
        callbacks=[ckpt, Keep()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
    )
    trainer.fit(LitCNN(), loader)
    np.savez(tmp / "probe.npz", inputs=x[:N_PROBE], labels=y[:N_PROBE])
    cfg = CaptureConfig(
        probe=str(tmp / "probe.npz"), model="tests.lightning_cnn.cnn_model:build", batch_size=200
    )
    report = ga.ingest(run, tmp / "s.zarr", capture=cfg, lr=0.1)
    assert not report.failed and report.ingested == [3, 6]
    return tmp / "s.zarr", states, x[:N_PROBE], y[:N_PROBE]


def test_weights_are_the_modules_bit_for_bit(trained):
    store, states, _, _ = trained
    tree = xr.open_datatree(str(store), engine="zarr")
    assert sorted(states) == [3, 6]
    for step, sd in states.items():
        for layer in ("conv1", "conv2", "fc"):
            w = sd[f"{layer}.weight"]
            got = tree[f"layers/{layer}"]["weight"].sel(step=step).values
            expected = w.reshape(w.shape[0], -1).numpy()  # (out, in): conv as (C_out, C_in k k)
            assert got.dtype == expected.dtype and np.array_equal(got, expected)
            bias = tree[f"layers/{layer}"]["bias"].sel(step=step).values
            assert np.array_equal(bias, sd[f"{layer}.bias"].numpy())


def test_tl_per_image_matches_the_papers_code(trained):
    store, states, x, y = trained
    ga.analyze(store, metrics=["tl"], conv_samples="image", tl_pca=256)  # the paper's code
    m = ga.open(store)["metrics"]
    attrs = m["target_linearity"].attrs["tl_samples_by_layer"]
    assert attrs["conv1"]["samples"] == "image" and attrs["conv1"]["features"] == 9 * 64
    assert attrs["conv2"]["features"] == 18 * 64 and attrs["conv2"]["tl_pca_components"] == 256
    assert attrs["fc"]["samples"] == "example"
    step = 6
    net = DigitsCNN()
    net.load_state_dict(states[step])
    with torch.no_grad():  # the layer inputs, as the paper's hooks see them
        h1 = torch.relu(net.conv1(torch.from_numpy(x)))
        h2 = torch.relu(net.conv2(h1))
    inputs = {"conv1": (x, net.conv1), "conv2": (h1.numpy(), net.conv2)}
    for layer, (X, conv) in inputs.items():
        cols = unfold_per_image(X, conv)
        tl = float(m["target_linearity"].sel(step=step, layer=layer))
        # float32 activations captured vs recomputed: TL agrees far below its own scale
        np.testing.assert_allclose(tl, paper_tl(cols, y), atol=2e-4)
        W = states[step][f"{layer}.weight"].flatten(1).numpy().astype(np.float64)
        s = float(m["tl_surrogate"].sel(step=step, layer=layer))
        np.testing.assert_allclose(s, paper_surrogate(cols, W, y), rtol=1e-4)
    fc_tl = float(m["target_linearity"].sel(step=step, layer="fc"))
    np.testing.assert_allclose(
        fc_tl, paper_tl(h2.flatten(1).numpy().astype(np.float64), y), atol=2e-4
    )
    assert 0.0 < float(m["target_linearity"].sel(step=step, layer="conv2")) < 1.0


def test_tl_from_stored_rows_exactly(trained):
    """Per image and mean over positions, from the store's own float32 rows (float64 reference)."""
    store, _, _, y = trained
    tree = xr.open_datatree(str(store), engine="zarr")
    H = tree["layers/conv1"]["input"].sel(step=6).values.astype(np.float64)  # (N * 64, 9)
    ga.analyze(store, metrics=["tl"], layers=["conv1"], conv_samples="mean")
    got = float(ga.open(store)["metrics"]["target_linearity"].sel(step=6, layer="conv1"))
    np.testing.assert_allclose(got, paper_tl(H.reshape(N_PROBE, 64, 9).mean(axis=1), y), atol=1e-9)
    ga.analyze(store, metrics=["tl"], layers=["conv1"], conv_samples="position")
    got = float(ga.open(store)["metrics"]["target_linearity"].sel(step=6, layer="conv1"))
    np.testing.assert_allclose(got, paper_tl(H, np.repeat(y, 64)), atol=1e-9)
    ga.analyze(store, metrics=["tl"], layers=["conv1"], conv_samples="image")
    got = float(ga.open(store)["metrics"]["target_linearity"].sel(step=6, layer="conv1"))
    np.testing.assert_allclose(got, paper_tl(H.reshape(N_PROBE, -1), y), atol=1e-9)
