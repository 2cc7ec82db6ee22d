"""A real Lightning Trainer with the callback: records beside each .ckpt, right values."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from gramlin_analyze.record import GramlinLightningCallback, read_record  # noqa: E402
from tests.record.helpers import batches, mlp, reference_step, rel  # noqa: E402

WIDTHS = (6, 10, 3)
LR = 0.2


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = mlp(WIDTHS, seed=30)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def test_lightning_callback_records_beside_checkpoints(tmp_path):
    data = batches(8, 4, WIDTHS[0], WIDTHS[-1], seed=31)  # 4 optimizer steps of 2 micro-batches
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(
            torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
        ),
        batch_size=4,
    )
    module = Net()
    reference = mlp(WIDTHS, seed=30)
    expected: dict[str, torch.Tensor] = {}
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    for k in range(4):  # the same global batches, one process, one backward each
        x = torch.cat([data[2 * k][0], data[2 * k + 1][0]])
        y = torch.cat([data[2 * k][1], data[2 * k + 1][1]])
        for name, terms in reference_step(reference, x, y, LR).items():
            expected[name] = expected.get(name, 0) + terms["vcs"]
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    ckpt = pl.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        precision="64-true",
        callbacks=[GramlinLightningCallback(mode="full", sgd_terms=True), ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=2.gramlin_record.safetensors",
        "epoch=0-step=4.ckpt",
        "epoch=0-step=4.gramlin_record.safetensors",
    ]
    rec_a, _ = read_record(tmp_path / files[1])
    rec_b, meta = read_record(tmp_path / files[3])
    assert meta["step"] == "4" and meta["global_step"] == "4" and meta["framework"] == "lightning"
    w_a = torch.load(tmp_path / files[0], weights_only=True)["state_dict"]
    w_b = torch.load(tmp_path / files[2], weights_only=True)["state_dict"]
    for name, vcs in expected.items():
        assert rel(rec_b[f"net.{name}.vcs"], vcs) < 1e-10
        Wa, Wb = w_a[f"net.{name}.weight"], w_b[f"net.{name}.weight"]
        d = {
            q: rec_b[f"net.{name}.{q}"] - rec_a[f"net.{name}.{q}"]
            for q in ("vcs_first", "sgd_second")
        }
        assert rel(d["vcs_first"] + d["sgd_second"], Wb.t() @ Wb - Wa.t() @ Wa) < 1e-8
