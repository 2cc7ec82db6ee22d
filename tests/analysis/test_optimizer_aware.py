"""Optimizer-aware metrics: the optimizer read from every checkpoint source into /steps, and the
metrics that assume plain SGD marked and warned about when a run used another optimizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import save_file
from torch import nn

from gramlin_analyze.cli import main
from gramlin_analyze.io.optimizer import describe_state, sgd_check
from gramlin_analyze.store.validate import validate_store
from tests.capture_models import build_mlp

FACTORY = "tests.capture_models:build_mlp"
SGD_MARKED = ("gram_vc_corr", "vcs_interval_corr", "fle_residual", "vcs_accumulated")


def _data(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((24, 5)).astype(np.float32)
    return x, rng.integers(0, 3, 24)


def _train(make_opt, steps, x, y, save):
    """A real training loop; ``save(step, model, opt)`` at each step in ``steps``."""
    model = build_mlp()
    opt = make_opt(model.parameters())
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(max(steps) + 1):
        if step in steps:
            save(step, model, opt)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()


def _torch_save_run(tmp_path, make_opt, x, y):
    run = tmp_path / "run"
    run.mkdir()

    def save(step, model, opt):
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
            run / f"step_{step:03d}.pt",
        )

    _train(make_opt, [0, 2, 4], x, y, save)
    return run


def _ingest_analyze(tmp_path, run, x, y, capsys):
    np.savez(tmp_path / "probe.npz", inputs=x, labels=y)
    store = str(tmp_path / "s.zarr")
    flags = ["--probe", str(tmp_path / "probe.npz"), "--model", FACTORY, "-q"]
    assert main(["ingest", str(run), "--store", store, *flags]) == 0
    capsys.readouterr()
    assert main(["analyze", store, "--metrics", "vc", "gram"]) == 0
    return store, capsys.readouterr().err


def test_adamw_torch_save_run_is_marked_and_warned(tmp_path, capsys):
    x, y = _data(3)
    run = _torch_save_run(
        tmp_path,
        lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.05),
        x,
        y,
    )
    store, err = _ingest_analyze(tmp_path, run, x, y, capsys)
    warn = [line for line in err.splitlines() if "assume plain SGD" in line]
    assert len(warn) == 1 and "AdamW" in warn[0] and "betas [0.8, 0.99]" in warn[0]
    assert "vcs_interval_corr" in warn[0] and "fle_residual" in warn[0]

    tree = xr.open_datatree(store, engine="zarr")
    steps = tree["steps"]
    assert list(steps["optimizer"].values) == ["AdamW"] * 3
    params = json.loads(str(steps["optimizer_params"].values[0]))
    assert params["lr"] == 0.01 and params["betas"] == [0.8, 0.99]
    assert params["weight_decay"] == 0.05 and params["eps"] == 1e-8
    assert "decoupled_weight_decay=True" in params["inferred_from"]
    np.testing.assert_array_equal(steps["lr"].values, [0.01, 0.01, 0.01])
    metrics = tree["metrics"]
    for name in SGD_MARKED:
        arr = metrics[name] if name in metrics else metrics["0"][name]
        assert arr.attrs["assumes"] == "sgd"
        assert arr.attrs["optimizer_check"].startswith("not plain SGD: AdamW")
    assert "assumes" not in metrics["0"]["gram"].attrs  # the Gram does not assume SGD
    assert "assumes" not in metrics["0"]["gg"].attrs
    assert validate_store(store) == []

    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "optimizer AdamW x3" in out
    info_warn = [line for line in out.splitlines() if "assume plain SGD" in line]
    assert len(info_warn) == 1 and "fle_residual" in info_warn[0] and "AdamW" in info_warn[0]


def test_plain_sgd_run_has_no_warning(tmp_path, capsys):
    x, y = _data(4)
    run = _torch_save_run(tmp_path, lambda p: torch.optim.SGD(p, lr=0.05), x, y)
    store, err = _ingest_analyze(tmp_path, run, x, y, capsys)
    assert "assume plain SGD" not in err
    tree = xr.open_datatree(store, engine="zarr")
    assert list(tree["steps"]["optimizer"].values) == ["SGD"] * 3
    assert tree["metrics"]["fle_residual"].attrs["optimizer_check"] == "plain SGD"
    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "optimizer SGD x3 (plain SGD)" in out and "assume plain SGD" not in out


def test_hf_trainer_directory_optimizer_pt(tmp_path, capsys):
    """A Trainer-style directory: model.safetensors, trainer_state.json and optimizer.pt."""
    x, y = _data(5)
    run = tmp_path / "hf"

    def save(step, model, opt):
        d = run / f"checkpoint-{step}"
        d.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors"
        )
        torch.save(opt.state_dict(), d / "optimizer.pt")
        state = {"global_step": step, "epoch": step / 4, "log_history": []}
        (d / "trainer_state.json").write_text(json.dumps(state))

    _train(lambda p: torch.optim.Adam(p, lr=0.003, weight_decay=0.01), [1, 3], x, y, save)
    store = str(tmp_path / "hf.zarr")
    assert main(["ingest", str(run), "--store", store, "-q"]) == 0
    steps = xr.open_datatree(store, engine="zarr")["steps"]
    assert list(steps["step"].values) == [1, 3]
    assert list(steps["optimizer"].values) == ["Adam"] * 2
    params = json.loads(str(steps["optimizer_params"].values[1]))
    assert params["source"] == "optimizer.pt" and params["weight_decay"] == 0.01
    assert (
        params["betas"] == [0.9, 0.999]
        and "decoupled_weight_decay=False" in params["inferred_from"]
    )
    capsys.readouterr()
    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    warn = [line for line in out.splitlines() if "assume plain SGD" in line]
    assert len(warn) == 1 and "Adam (betas [0.9, 0.999], weight_decay 0.01)" in warn[0]


@pytest.mark.parametrize(
    ("make", "family", "telling"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "SGD", "nesterov"),
        (lambda p: torch.optim.AdamW(p, lr=0.1), "AdamW", "decoupled_weight_decay=True"),
        (lambda p: torch.optim.RMSprop(p, lr=0.1), "RMSprop", "centered"),
        (lambda p: torch.optim.Adagrad(p, lr=0.1), "Adagrad", "lr_decay"),
    ],
)
def test_family_and_evidence_from_a_state_dict(make, family, telling):
    model = nn.Linear(3, 2)
    opt = make(model.parameters())
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    info = describe_state(opt.state_dict(), "optimizer")
    assert info.family == family and telling in info.inferred_from
    group = opt.state_dict()["param_groups"][0]
    for key in ("lr", "momentum", "eps", "weight_decay"):
        if key in group:
            assert info.params[key] == group[key]


def test_sgd_check_counts_the_steps():
    adam = json.dumps({"betas": [0.9, 0.999], "weight_decay": 0.0})
    assert sgd_check([]) == ("unknown", None)
    assert sgd_check([("", ""), ("SGD", json.dumps({"momentum": 0}))]) == ("plain SGD", None)
    check, used = sgd_check([("SGD", "{}"), ("Adam", adam), ("Adam", adam)])
    assert check == "not plain SGD: Adam (betas [0.9, 0.999]) at 2 of 3 recorded steps"
    assert used == "Adam (betas [0.9, 0.999])"
    assert sgd_check([("SGD", json.dumps({"momentum": 0.9}))])[1] == "SGD (momentum 0.9)"


@pytest.mark.slow  # importing Lightning and one Trainer.fit: several seconds
def test_lightning_checkpoint_optimizer_states(tmp_path):
    """A real Lightning ``Trainer.fit`` checkpoint: ``optimizer_states`` into /steps."""
    import warnings

    L = pytest.importorskip("lightning")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9, nesterov=True)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    )
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path / "run",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's dataloader-worker advice
        trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    store = str(tmp_path / "l.zarr")
    assert main(["ingest", str(tmp_path / "run" / "checkpoints"), "--store", store, "-q"]) == 0
    steps = xr.open_datatree(store, engine="zarr")["steps"]
    assert list(steps["optimizer"].values) == ["SGD"]
    params = json.loads(str(steps["optimizer_params"].values[0]))
    assert params["momentum"] == 0.9 and params["nesterov"] is True and params["lr"] == 0.02
    assert "nesterov" in params["inferred_from"]
    assert sgd_check([("SGD", str(steps["optimizer_params"].values[0]))])[1] == (
        "SGD (momentum 0.9, nesterov True)"
    )


@pytest.mark.slow  # importing transformers: several seconds
def test_hf_training_args_settle_adam_against_adamw(tmp_path):
    """``training_args.bin`` (a real pickled ``TrainingArguments``, parsed, never unpickled)."""
    from transformers import TrainingArguments

    from gramlin_analyze.io.optimizer import hf_optimizer, training_args

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), optim="adamw_torch", weight_decay=0.02, adam_beta2=0.98
    )
    d = tmp_path / "checkpoint-7"
    d.mkdir()
    torch.save(args, d / "training_args.bin")
    assert training_args(d / "training_args.bin") == {
        "learning_rate": args.learning_rate,
        "optim": "adamw_torch",
        "weight_decay": 0.02,
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        "adam_epsilon": args.adam_epsilon,
    }
    alone = hf_optimizer(d)  # no optimizer.pt (save_only_model): the arguments tell
    assert alone.family == "AdamW" and alone.params["betas"] == [0.9, 0.98]
    assert alone.inferred_from == "training_args.bin optim=adamw_torch"
    # An optimizer state as PyTorch before decoupled_weight_decay wrote it: Adam and AdamW alike.
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.004, weight_decay=0.02)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["decoupled_weight_decay"]
    torch.save(state, d / "optimizer.pt")
    both = hf_optimizer(d)
    assert both.family == "AdamW" and both.params["lr"] == 0.004
    assert both.inferred_from.startswith("training_args.bin optim=adamw_torch; param_groups keys")
