"""Readers of the PyTorch family (safetensors, torch.save, Lightning, HF Trainer) and NumPy.

Each conformance class writes a tiny real checkpoint with the framework's own
saving code; the module-level tests cover what is specific to one reader.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

import gramlin_analyze
from gramlin_analyze.errors import CheckpointFormatError, UnsafeCheckpointError, UsageError
from gramlin_analyze.io.registry import get_reader, guess_reader
from gramlin_analyze.testing import ReaderConformance, Written, seeded_arrays

requires_lightning = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="needs lightning"
)

SHAPES = {
    "encoder.0.weight": (6, 4),
    "encoder.0.bias": (6,),
    "conv.weight": (5, 3, 3, 3),
    "head.weight": (2, 6),
}


def state_dict(seed: int, shapes=SHAPES) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    arrays = seeded_arrays(seed, shapes)
    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, arrays


def numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def trained(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def write_shards(
    directory: Path, tensors: dict[str, torch.Tensor], *, kind: str, stem: str
) -> Path:
    """Two shards plus an index, named and laid out as transformers writes them."""
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    suffix = ".safetensors" if kind == "safetensors" else ".bin"
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        shard = f"{stem}-{i:05d}-of-{len(halves):05d}{suffix}"
        shard_tensors = {k: tensors[k].contiguous() for k in part}
        if kind == "safetensors":
            save_file(shard_tensors, directory / shard, metadata={"format": "pt"})
        else:
            torch.save(shard_tensors, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = directory / f"{stem}{suffix}.index.json"
    index.write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return index


# -- safetensors ------------------------------------------------------------------


class TestSafetensorsReader(ReaderConformance):
    reader_name = "safetensors"

    @pytest.fixture
    def written(self, tmp_path):
        tensors, arrays = state_dict(0)
        path = tmp_path / "model.safetensors"
        save_file(tensors, path, metadata={"format": "pt"})
        return Written(path=path, expected=arrays, main_file=path)


def test_safetensors_bfloat16_is_float32(tmp_path):
    tensors = {k: t.to(torch.bfloat16) for k, t in state_dict(1)[0].items()}
    path = tmp_path / "bf16.safetensors"
    save_file(tensors, path)
    reader = get_reader("safetensors")
    infos = reader.list_tensors(path)
    for name, tensor in tensors.items():
        assert infos[name].dtype == "bfloat16"
        got = reader.read_tensor(path, name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, tensor.to(torch.float32).numpy())


def test_scan_and_read_safetensors_never_import_torch(tmp_path):
    """Scanning a run, reading float32 safetensors, and a weights-only ingest and
    analyze through the CLI stay torch-free (a second per process saved); the
    values still match what torch saved."""
    tensors, arrays = state_dict(2)
    run = tmp_path / "run"
    run.mkdir()
    save_file(tensors, run / "step_100.safetensors")
    np.savez(tmp_path / "expected.npz", **arrays)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import gramlin_analyze as ga
        from gramlin_analyze.io.registry import get_reader
        (src,) = ga.scan({str(run)!r})
        expected = np.load({str(tmp_path / "expected.npz")!r})
        with get_reader("safetensors").open(src.path) as h:
            for name in expected.files:
                np.testing.assert_array_equal(h.read_tensor(name), expected[name])
        from gramlin_analyze.cli import main
        store = {str(tmp_path / "s.zarr")!r}
        assert main(["ingest", {str(run)!r}, "--store", store, "-q"]) == 0
        assert main(["analyze", store, "--metrics", "gram", "-q"]) == 0
        np.testing.assert_allclose(
            ga.open(store)["layers/head"]["weight"].values[0], expected["head.weight"]
        )
        print("torch" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"])
def test_safetensors_float8_is_float32(tmp_path, dtype):
    """Dtypes NumPy lacks go through torch and come back float32, the values torch
    itself widens them to (a dtype missing from the numpy path must not crash)."""
    if not hasattr(torch, dtype):
        pytest.skip(f"this torch has no {dtype}")
    g = torch.Generator().manual_seed(3)
    t = (torch.rand(4, 3, generator=g) + 0.5).to(getattr(torch, dtype))
    path = tmp_path / f"{dtype}.safetensors"
    save_file({"w": t}, path)
    got = get_reader("safetensors").read_tensor(path, "w")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, t.to(torch.float32).numpy())


def test_safetensors_save_model(tmp_path):
    model = tiny_model(2)
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    with get_reader("safetensors").open(path) as handle:
        assert set(handle.list_tensors()) == set(model.state_dict())
        for name, expected in numpy_state(model).items():
            np.testing.assert_array_equal(handle.read_tensor(name), expected)


@pytest.fixture(params=["index", "directory"])
def sharded_safetensors(request, tmp_path):
    tensors, arrays = state_dict(3)
    index = write_shards(tmp_path, tensors, kind="safetensors", stem="model")
    path = index if request.param == "index" else tmp_path
    return Written(path=path, expected=arrays, main_file=index)


class TestShardedSafetensorsReader(ReaderConformance):
    reader_name = "safetensors-sharded"

    @pytest.fixture
    def written(self, sharded_safetensors):
        return sharded_safetensors


def test_sharded_files_are_index_and_shards(sharded_safetensors):
    files = get_reader("safetensors-sharded").files(sharded_safetensors.path)
    index = sharded_safetensors.main_file
    assert files[0] == index
    assert sorted(f.name for f in files[1:]) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_sharded_damaged_shard_is_named(sharded_safetensors):
    shard = sharded_safetensors.main_file.parent / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CheckpointFormatError, match="model-00002-of-00002.safetensors"):
        get_reader("safetensors-sharded").list_tensors(sharded_safetensors.path)
    shard.unlink()
    with pytest.raises(CheckpointFormatError, match="model-00002-of-00002.safetensors.*missing"):
        get_reader("safetensors-sharded").list_tensors(sharded_safetensors.path)


def test_sharded_index_cannot_point_outside_its_directory(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match="elsewhere"):
        get_reader("safetensors-sharded").list_tensors(index)


# -- torch.save -------------------------------------------------------------------


class TestTorchStateDict(ReaderConformance):
    reader_name = "torch"

    @pytest.fixture(params=["zip", "legacy"])
    def written(self, request, tmp_path):
        tensors, arrays = state_dict(4)
        path = tmp_path / "model.pt"
        torch.save(tensors, path, _use_new_zipfile_serialization=request.param == "zip")
        return Written(path=path, expected=arrays, main_file=path)


class TestTorchTrainingCheckpoint(ReaderConformance):
    reader_name = "torch"

    @pytest.fixture
    def written(self, tmp_path):
        model = tiny_model(5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        trained(model, optimizer)
        path = tmp_path / "checkpoint.pth"
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": 7,
                "epoch": 2,
            },
            path,
        )
        return Written(
            path=path,
            expected=numpy_state(model),
            main_file=path,
            step=7,
            extra_meta={"lr": 3e-4, "epoch": 2},
        )

    def test_optimizer_family(self, reader, written):
        assert reader.read_metadata(written.path).optimizer == "AdamW"


@pytest.mark.parametrize(
    ("make", "family"),
    [
        (lambda p: torch.optim.Adam(p, lr=1e-3), "Adam"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "SGD"),
        (lambda p: torch.optim.SGD(p, lr=0.1), "SGD"),
        (lambda p: torch.optim.RMSprop(p, lr=1e-3), "RMSprop"),
        (lambda p: torch.optim.Adagrad(p, lr=1e-2), "Adagrad"),
        (lambda p: torch.optim.NAdam(p, lr=1e-3), "NAdam"),
    ],
)
def test_optimizer_family_and_lr(tmp_path, make, family):
    model = tiny_model(6)
    optimizer = make(model.parameters())
    trained(model, optimizer, steps=1)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict()}, path
    )
    meta = get_reader("torch").read_metadata(path)
    assert meta.optimizer == family
    assert meta.lr == pytest.approx(optimizer.param_groups[0]["lr"])
    assert meta.step is None


@pytest.fixture
def ema_checkpoint(tmp_path):
    live, live_arrays = state_dict(7)
    ema, ema_arrays = state_dict(8)
    path = tmp_path / "ema.pt"
    torch.save({"model": live, "ema": {"model": ema, "decay": 0.999}, "iteration": 12}, path)
    return path, live_arrays, ema_arrays


def test_state_dict_key_option(ema_checkpoint):
    path, live_arrays, ema_arrays = ema_checkpoint
    default = get_reader("torch")
    np.testing.assert_array_equal(
        default.read_tensor(path, "head.weight"), live_arrays["head.weight"]
    )
    assert default.read_metadata(path).step == 12
    ema = get_reader("torch", state_dict_key="ema.model")
    assert set(ema.list_tensors(path)) == set(ema_arrays)
    for name, expected in ema_arrays.items():
        np.testing.assert_array_equal(ema.read_tensor(path, name), expected)


def test_missing_state_dict_key_lists_available_keys(ema_checkpoint):
    path = ema_checkpoint[0]
    with pytest.raises(UsageError) as info:
        get_reader("torch", state_dict_key="ema.weights").list_tensors(path)
    message = str(info.value)
    assert path.name in message and "'ema.weights'" in message
    assert all(f"'{key}'" in message for key in ("model", "ema", "iteration"))


def test_ambiguous_state_dict_lists_keys(tmp_path):
    path = tmp_path / "two.pt"
    torch.save({"generator": state_dict(9)[0], "discriminator": state_dict(10)[0]}, path)
    with pytest.raises(CheckpointFormatError, match="'generator'.*'discriminator'.*state_dict_key"):
        get_reader("torch").list_tensors(path)


def test_state_dict_with_extras_beside_it(tmp_path):
    model = tiny_model(22)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained(model, optimizer, steps=1)
    path = tmp_path / "flat.pt"
    torch.save({**model.state_dict(), "optimizer": optimizer.state_dict(), "step": 4}, path)
    reader = get_reader("torch")
    assert set(reader.list_tensors(path)) == set(model.state_dict())
    meta = reader.read_metadata(path)
    assert (meta.step, meta.optimizer, meta.lr) == (4, "SGD", pytest.approx(0.1))


def test_bare_tensor_is_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointFormatError, match=r"tensor\.pt.*state_dict"):
        get_reader("torch").list_tensors(path)


class _RunsShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _CallsEval:
    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return (eval, (self.source,))


@pytest.mark.parametrize("reader_name", ["torch", "lightning"])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [_RunsShellCommand, _CallsEval])
def test_hostile_pickle_is_refused(tmp_path, reader_name, zipped, payload):
    marker = tmp_path / "MARKER"
    command = f"touch {marker}"
    if payload is _CallsEval:
        command = f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / ("evil.ckpt" if reader_name == "lightning" else "evil.pt")
    torch.save(
        {"state_dict": state_dict(11)[0], "payload": payload(command)},
        path,
        _use_new_zipfile_serialization=zipped,
    )
    reader = get_reader(reader_name)
    with pytest.raises(UnsafeCheckpointError) as info:
        reader.list_tensors(path)
    assert path.name in str(info.value) and "run code" in str(info.value)
    with pytest.raises(UnsafeCheckpointError), reader.open(path) as handle:
        handle.read_metadata()
    assert not marker.exists()


# -- Lightning --------------------------------------------------------------------


@pytest.fixture(scope="session")
def lightning_checkpoint(tmp_path_factory):
    """One real ``Trainer.fit`` run per session; tests copy its checkpoint."""
    import lightning as L

    class TinyModule(L.LightningModule):
        def __init__(self, hidden: int = 6, lr: float = 0.05, data_dir: Path = Path("/data")):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(12)
    g = torch.Generator().manual_seed(13)
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    )
    module = TinyModule(data_dir=root / "data")
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        # Lightning's own deprecation and dataloader-worker advice, irrelevant here.
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    (path,) = (root / "checkpoints").glob("*.ckpt")
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr < 0.05  # the scheduler stepped, so the saved lr is not the initial one
    return path, numpy_state(module), lr


@requires_lightning
class TestLightningReader(ReaderConformance):
    reader_name = "lightning"

    @pytest.fixture
    def written(self, lightning_checkpoint, tmp_path):
        source, expected, lr = lightning_checkpoint
        path = tmp_path / source.name
        shutil.copyfile(source, path)
        return Written(
            path=path, expected=expected, main_file=path, step=3, extra_meta={"epoch": 0, "lr": lr}
        )

    def test_optimizer_and_version(self, reader, written):
        meta = reader.read_metadata(written.path)
        assert meta.optimizer == "AdamW"
        assert meta.extra["lightning_version"]

    def test_allow_list_is_scoped(self, reader, written):
        before = set(torch.serialization.get_safe_globals())
        reader.list_tensors(written.path)
        assert set(torch.serialization.get_safe_globals()) == before
        # The Path hyperparameter needs the allow-list: plain torch.load refuses it.
        with pytest.raises(UnsafeCheckpointError, match="pathlib"):
            get_reader("torch").list_tensors(written.path)


@requires_lightning
def test_lightning_reader_works_without_lightning(lightning_checkpoint):
    path, expected, _ = lightning_checkpoint
    script = textwrap.dedent(
        f"""
        import sys
        for name in ("lightning", "pytorch_lightning", "lightning_fabric"):
            sys.modules[name] = None  # any import of Lightning now fails
        from gramlin_analyze.io.lightning import LightningReader
        reader = LightningReader()
        names = sorted(reader.list_tensors({str(path)!r}))
        assert reader.read_metadata({str(path)!r}).step == 3
        print(",".join(names))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(gramlin_analyze.__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split(",") == sorted(expected)


def test_lightning_lr_from_scheduler(tmp_path):
    path = tmp_path / "fabric.ckpt"
    tensors, arrays = state_dict(14)
    torch.save(
        {
            "state_dict": tensors,
            "global_step": 5,
            "epoch": 1,
            "lr_schedulers": [{"_last_lr": [0.02]}],
        },
        path,
    )
    meta = get_reader("lightning").read_metadata(path)
    assert (meta.step, meta.epoch, meta.lr) == (5, 1, pytest.approx(0.02))


# -- Hugging Face Trainer ---------------------------------------------------------


def write_trainer_state(
    directory: Path, *, global_step: int, log_history: list[dict], tokens: int = 0
) -> None:
    """``trainer_state.json`` as ``transformers.TrainerState.save_to_json`` writes it."""
    state = {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": 1.5,
        "eval_steps": 500,
        "global_step": global_step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": log_history,
        "logging_steps": 10,
        "max_steps": 60,
        "num_input_tokens_seen": tokens,
        "num_train_epochs": 3,
        "save_steps": 30,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": False,
                    "should_save": True,
                    "should_training_stop": False,
                },
                "attributes": {},
            }
        },
        "total_flos": 1234.0,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    (directory / "trainer_state.json").write_text(text)


LOG_HISTORY = [
    {"epoch": 0.5, "grad_norm": 1.9, "learning_rate": 4.5e-05, "loss": 2.31, "step": 10},
    {"epoch": 1.0, "grad_norm": 1.7, "learning_rate": 3.5e-05, "loss": 2.02, "step": 20},
    {"epoch": 1.0, "eval_loss": 1.98, "eval_runtime": 0.51, "step": 20},
    {"epoch": 1.5, "grad_norm": 1.2, "learning_rate": 2.5e-05, "loss": 1.87, "step": 30},
    {"epoch": 1.5, "eval_loss": 1.81, "eval_runtime": 0.49, "step": 30},
]


@pytest.fixture(params=["safetensors", "bin", "sharded-safetensors", "sharded-bin"])
def hf_checkpoint(request, tmp_path):
    directory = tmp_path / "checkpoint-30"
    directory.mkdir()
    tensors, arrays = state_dict(15)
    if request.param == "safetensors":
        main = directory / "model.safetensors"
        save_file(tensors, main, metadata={"format": "pt"})
    elif request.param == "bin":
        main = directory / "pytorch_model.bin"
        torch.save(tensors, main)
    else:
        kind, stem = (
            ("safetensors", "model") if "safetensors" in request.param else ("bin", "pytorch_model")
        )
        main = write_shards(directory, tensors, kind=kind, stem=stem)
    write_trainer_state(directory, global_step=30, log_history=LOG_HISTORY)
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    torch.save(
        {"state": {}, "param_groups": [{"lr": 2.5e-05, "params": []}]}, directory / "optimizer.pt"
    )
    torch.save({"last_epoch": 30}, directory / "scheduler.pt")
    torch.save({"cpu_rng_state": torch.get_rng_state()}, directory / "rng_state.pth")
    return Written(
        path=directory,
        expected=arrays,
        main_file=main,
        step=30,
        extra_meta={"epoch": 1.5, "lr": 2.5e-05},
    )


def test_hf_tokens_seen_only_when_counted(tmp_path):
    """The Trainer writes ``num_input_tokens_seen: 0`` unless it counts tokens: not a value."""
    from gramlin_analyze.io.hf import HFTrainerReader

    for tokens, expected in ((4096, 4096.0), (0, None)):
        directory = tmp_path / f"checkpoint-30-{tokens}"
        directory.mkdir()
        save_file({"w": torch.ones(2, 2)}, directory / "model.safetensors")
        write_trainer_state(directory, global_step=30, log_history=LOG_HISTORY, tokens=tokens)
        assert HFTrainerReader().read_metadata(directory).tokens_seen == expected


class TestHFTrainerReader(ReaderConformance):
    reader_name = "hf-trainer"

    @pytest.fixture
    def written(self, hf_checkpoint):
        return hf_checkpoint


def test_hf_files_are_weights_and_trainer_state(hf_checkpoint):
    names = {f.name for f in get_reader("hf-trainer").files(hf_checkpoint.path)}
    assert "trainer_state.json" in names and hf_checkpoint.main_file.name in names
    assert not names & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "config.json"}
    weights = {n for n in names if n != "trainer_state.json"}
    assert len(weights) in (1, 3)  # one file, or an index and its two shards


def test_hf_lr_is_logged_at_or_before_global_step(tmp_path):
    save_file(state_dict(16)[0], tmp_path / "model.safetensors")
    later = {"epoch": 2.0, "learning_rate": 1.5e-05, "loss": 1.7, "step": 40}
    write_trainer_state(tmp_path, global_step=30, log_history=[*LOG_HISTORY, later])
    meta = get_reader("hf-trainer").read_metadata(tmp_path)
    assert meta.step == 30 and meta.lr == pytest.approx(2.5e-05)


def test_hf_needs_trainer_state_to_be_guessed(tmp_path):
    save_file(state_dict(17)[0], tmp_path / "model.safetensors")
    assert not get_reader("hf-trainer").guess_can_read(tmp_path)
    write_trainer_state(tmp_path, global_step=30, log_history=LOG_HISTORY)
    assert guess_reader(tmp_path).name == "hf-trainer"
    (tmp_path / "trainer_state.json").write_text('{"global_step": 3')
    with pytest.raises(CheckpointFormatError, match="trainer_state.json"):
        get_reader("hf-trainer").read_metadata(tmp_path)


# -- NumPy .npz -------------------------------------------------------------------


class TestNpzReader(ReaderConformance):
    reader_name = "npz"

    @pytest.fixture(params=["savez", "savez_compressed"])
    def written(self, request, tmp_path):
        arrays = seeded_arrays(18, SHAPES) | seeded_arrays(19, {"count": (3,)}, dtype=np.int64)
        path = tmp_path / "weights.npz"
        getattr(np, request.param)(path, **arrays)
        return Written(path=path, expected=arrays, main_file=path)

    def test_dtypes_from_headers(self, reader, written):
        infos = reader.list_tensors(written.path)
        assert {name: info.dtype for name, info in infos.items()} == {
            name: arr.dtype.name for name, arr in written.expected.items()
        }


def test_npz_lists_without_reading_array_bytes(tmp_path):
    (arr,) = seeded_arrays(20, {"w": (64, 64)}).values()
    path = tmp_path / "big.npz"
    np.savez(path, w=arr)
    with zipfile.ZipFile(path) as archive:
        member = archive.getinfo("w.npy")
    raw = bytearray(path.read_bytes())
    name_len, extra_len = np.frombuffer(
        raw[member.header_offset + 26 : member.header_offset + 30], "<u2"
    )
    data_end = member.header_offset + 30 + int(name_len) + int(extra_len) + member.compress_size
    raw[data_end - 8] ^= 0xFF  # inside the array bytes: only the CRC check can notice
    path.write_bytes(bytes(raw))
    reader = get_reader("npz")
    assert reader.list_tensors(path)["w"].shape == (64, 64)
    with pytest.raises(CheckpointFormatError, match="big.npz"):
        reader.read_tensor(path, "w")


def test_npz_object_array_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, w=seeded_arrays(21, {"w": (2, 2)})["w"], meta=np.array([{"a": 1}], dtype=object))
    reader = get_reader("npz")
    for attempt in (lambda: reader.list_tensors(path), lambda: reader.read_tensor(path, "meta")):
        with pytest.raises(
            CheckpointFormatError, match="objects.npz.*'meta'.*Python objects"
        ) as info:
            attempt()
        assert not isinstance(info.value, UnsafeCheckpointError)


def test_safetensors_tensors_are_views_of_the_file(tmp_path):
    """NumPy-dtype tensors are read-only views of the file's memory map (no copy),
    with the values, dtype and shape safetensors' own loader gives; a tensor
    whose bytes lie outside the file is one clear error naming it."""
    import json as _json

    from safetensors.numpy import load_file, save_file

    from gramlin_analyze.errors import CheckpointFormatError
    from gramlin_analyze.io.registry import reader_for

    rng = np.random.default_rng(5)
    sd = {
        "a.weight": rng.standard_normal((7, 3)).astype(np.float32),
        "b.weight": rng.standard_normal((2, 5)).astype(np.float64),
        "c": rng.integers(-9, 9, (4,), dtype=np.int16),
        "d": np.zeros((0, 3), np.float16),
    }
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    ref = load_file(str(path))
    with reader_for("safetensors").open(path) as h:
        for name, want in ref.items():
            got = h.read_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            assert not got.flags.writeable and not got.flags.owndata
    # Shrink a tensor's declared extent beyond the end of the file: refused by name.
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = _json.loads(raw[8 : 8 + n])
    header["a.weight"]["data_offsets"][1] += 4
    body = _json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (n - len(body))
    assert len(body) == n
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[:8] + body + raw[8 + n :])
    with (
        reader_for("safetensors").open(bad) as h,
        pytest.raises(CheckpointFormatError, match="bad.safetensors"),
    ):
        h._view(
            "a.weight", "F32"
        )  # the map's own check (safetensors' header check comes first in read_tensor)
