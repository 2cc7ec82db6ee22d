"""Run metadata: hyper-parameters read from real checkpoints without running code, and
``--run-name`` / ``--run-attr`` on ``ingest``, stored, validated, shown and opened."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import gramlin_analyze as ga
from gramlin_analyze.cli import main
from gramlin_analyze.errors import UsageError
from gramlin_analyze.io.run_meta import flatten_plain, read_run_metadata, safe_unpickle
from gramlin_analyze.store.info import store_info
from gramlin_analyze.store.provenance import parse_run_attrs


def test_run_attrs_are_typed():
    got = parse_run_attrs(
        ["label_noise=0.5", "seed=3", "wd=1e-4", "flag=true", "off=False", "opt=sgd", "x=nan"]
    )
    assert got == {
        "label_noise": 0.5, "seed": 3, "wd": 1e-4, "flag": True, "off": False, "opt": "sgd", "x": "nan"
    }  # fmt: skip
    assert type(got["seed"]) is int and type(got["label_noise"]) is float
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_run_attrs(["label_noise"])


class _Boom:
    """A pickle that would run a command if it were unpickled for real."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_unpickling_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps({"lr": 0.1, "hook": _Boom(marker), "tags": ["a", "b"]}, protocol=4)
    value = safe_unpickle(data)
    assert value["lr"] == 0.1 and value["tags"] == ["a", "b"]
    assert value["hook"].name == "posix.system" or value["hook"].name == "os.system"
    assert not marker.exists()
    cyclic: list = [1.5]
    cyclic.append(cyclic)
    assert flatten_plain({"a": safe_unpickle(pickle.dumps({"x": cyclic, "y": 2}))}) == {"a.y": 2}
    # a damaged file is a note, not a failure
    (tmp_path / "training_args.bin").write_bytes(pickle.dumps({"lr": 0.1})[:-3])
    (tmp_path / "config.json").write_text('{"hidden_size": 8, "id2label": {"0": "a"}}')
    found = read_run_metadata([tmp_path / "weights.safetensors"])
    assert found.hyperparameters == {"model.hidden_size": 8}
    assert len(found.notes) == 1 and "training_args.bin" in found.notes[0]


def _hf_checkpoint(root: Path, step: int) -> Path:
    """A ``checkpoint-N`` directory as ``Trainer`` writes it, each file by its library's own
    saving code: weights, ``config.json``, ``trainer_state.json``, ``training_args.bin``."""
    from safetensors.torch import save_file
    from transformers import BertConfig, TrainerState, TrainingArguments

    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    gen = torch.Generator().manual_seed(step)
    save_file({"fc.weight": torch.randn(3, 4, generator=gen)}, str(ckpt / "model.safetensors"))
    BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2).save_pretrained(ckpt)
    state = TrainerState(global_step=step, max_steps=20, train_batch_size=4, save_steps=step)
    state.save_to_json(str(ckpt / "trainer_state.json"))
    args = TrainingArguments(
        output_dir=str(root), learning_rate=3e-4, weight_decay=0.1, seed=7, report_to=[],
        hub_token="do-not-store",
    )  # fmt: skip
    torch.save(args, ckpt / "training_args.bin")
    return ckpt


@pytest.fixture
def hf_run(tmp_path):
    root = tmp_path / "hf-run"
    for step in (5, 10):
        _hf_checkpoint(root, step)
    return root


def test_hf_hyperparameters(hf_run):
    found = read_run_metadata([hf_run / "checkpoint-5", hf_run / "checkpoint-10"])
    hp = found.hyperparameters
    assert hp["learning_rate"] == 3e-4 and hp["weight_decay"] == 0.1 and hp["seed"] == 7
    assert hp["lr_scheduler_type"] == "linear"  # an enum member: its value
    assert hp["train_batch_size"] == 4 and hp["max_steps"] == 20
    assert hp["model.hidden_size"] == 8 and hp["model.model_type"] == "bert"
    assert not any("token" in k for k in hp), "credentials never reach a store"
    assert all("checkpoint-10" in s for s in found.sources) and len(found.sources) == 3


def _attrs(store: Path) -> dict:
    return dict(zarr.open_group(str(store), mode="r").attrs)


def test_ingest_records_run_metadata(hf_run, tmp_path, capsys):
    store = tmp_path / "hf.zarr"
    args = ["ingest", str(hf_run), "--store", str(store), "-q", "--run-name", "wd-sweep-1"]
    attrs = ["--run-attr", "label_noise=0.5", "--run-attr", "seed=3", "--run-attr", "opt=sgd"]
    assert main(args + attrs) == 0
    root = _attrs(store)
    assert root["run_name"] == "wd-sweep-1"
    assert root["run_attrs"] == {"label_noise": 0.5, "seed": 3, "opt": "sgd"}
    assert root["hyperparameters"]["learning_rate"] == 3e-4
    assert main(["validate", str(store), "-q"]) == 0
    text = store_info(store)
    assert "label_noise=0.5" in text and "learning_rate=0.0003" in text
    # The same attributes again, and a new one: merged. Another value: refused, one line.
    assert main(args + attrs + ["--run-attr", "width=64"]) == 0
    assert _attrs(store)["run_attrs"]["width"] == 64
    capsys.readouterr()
    assert main(args + ["--run-attr", "label_noise=0.25"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "label_noise=0.5" in err and "--replace-run-attrs" in err
    assert _attrs(store)["run_attrs"]["label_noise"] == 0.5
    assert main(args + ["--run-attr", "label_noise=0.25", "--replace-run-attrs"]) == 0
    assert _attrs(store)["run_attrs"] == {"label_noise": 0.25}
    assert main(["validate", str(store), "-q"]) == 0


def test_python_api_and_lightning_hyperparameters(tmp_path):
    """``ga.ingest(run_name=, run_attrs=)`` on a real Lightning run; the ``.ckpt``'s
    ``hyper_parameters`` (a path and a nested dict among them) are recorded."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, hidden=5, lr=0.01, data_dir=Path("/data"), opt=None):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Linear(4, hidden)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    module = Tiny(hidden=3, lr=0.02, data_dir=tmp_path / "d", opt={"name": "sgd", "momentum": 0.9})
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, default_root_dir=tmp_path,
    )  # fmt: skip
    data = torch.utils.data.TensorDataset(torch.randn(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    store = tmp_path / "lt.zarr"
    report = ga.ingest(
        tmp_path / "checkpoints", store, run_name="lt", run_attrs={"label_noise": 1.0}
    )
    assert not report.failed
    hp = _attrs(store)["hyperparameters"]
    assert hp == {
        "hidden": 3, "lr": 0.02, "data_dir": str(tmp_path / "d"), "opt.name": "sgd",
        "opt.momentum": 0.9,
    }  # fmt: skip
    with pytest.raises(UsageError, match="finite number"):
        ga.ingest(tmp_path / "checkpoints", store, run_attrs={"bad": float("nan")})
    with pytest.raises(UsageError, match="label_noise=1.0"):
        ga.ingest(tmp_path / "checkpoints", store, run_attrs={"label_noise": 0.0})


def test_open_runs_takes_both_sources(hf_run, tmp_path):
    """``hyperparameters`` and ``run_attrs`` become coordinates; ``run_attrs`` wins."""
    stores = []
    for i, noise in enumerate((0.0, 0.5)):
        store = tmp_path / f"r{i}.zarr"
        ga.ingest(hf_run, store, run_attrs={"label_noise": noise, "seed": 10 + i})
        ga.analyze(store, metrics=["effective_rank"])
        stores.append(store)
    ds = ga.open_runs(stores)["metrics"].to_dataset()
    assert ds["label_noise"].values.tolist() == [0.0, 0.5]
    assert ds["seed"].values.tolist() == [10, 11]  # the user's, over training_args' 7
    np.testing.assert_array_equal(ds["learning_rate"].values, [3e-4, 3e-4])
    read = _attrs(stores[0])["hyperparameters_from"]
    assert sorted(Path(f).name for f in read) == [
        "config.json", "trainer_state.json", "training_args.bin"
    ] and all(Path(f).parent.name == "checkpoint-10" for f in read)  # fmt: skip
