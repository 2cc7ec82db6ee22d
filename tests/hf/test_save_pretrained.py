"""Bare ``save_pretrained`` directories (no ``trainer_state.json``): the plain safetensors
and PyTorch readers apply the ``config.json`` beside the weights, so GPT-2's ``Conv1D``
weights are stored ``(out, in)`` by a weights-only ingest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
import xarray as xr  # noqa: E402

from gramlin_analyze.cli import main  # noqa: E402
from gramlin_analyze.io.registry import reader_for  # noqa: E402
from tests.hf import trainer_runs as runs  # noqa: E402

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _save(directory, seed: int, *, safe: bool) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(runs.gpt2_config())
    model.save_pretrained(directory, safe_serialization=safe)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_save_pretrained_dirs_store_conv1d_out_in_with_bias(tmp_path, safe):
    run = tmp_path / "run"
    saved = {step: _save(run / f"step-{step}", step, safe=safe) for step in (100, 200)}
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(run), "--store", str(store), "-q"]) == 0
    tree = xr.open_datatree(str(store), engine="zarr")
    for step, sd in saved.items():
        for i in range(runs.LAYERS):
            for module in CONV1D:
                name = f"transformer.h.{i}.{module}"
                layer = tree[f"layers/{name}"]
                ds = layer.to_dataset().sel(step=step)
                w = sd[f"{name}.weight"]
                assert ds["weight"].shape == w.T.shape, name
                np.testing.assert_array_equal(ds["weight"].values, w.T, err_msg=name)
                np.testing.assert_array_equal(ds["bias"].values, sd[f"{name}.bias"])
                assert layer.attrs["orientation_source"] == "config"
    assert tree["layers/lm_head"].attrs["tied_to"] == "transformer.wte"


def test_plain_file_reads_the_config_beside_it_and_only_once(tmp_path):
    sd = _save(tmp_path, 3, safe=True)
    name = "transformer.h.1.attn.c_proj.weight"  # square: its shape says nothing
    with reader_for("safetensors", {}).open(tmp_path / "model.safetensors") as h:
        info = h.list_tensors()[name]
        assert info.orientation == "config" and info.source_layout == "in_out"
        np.testing.assert_array_equal(h.read_tensor(name), sd[name].T)
    (tmp_path / "trainer_state.json").write_text('{"global_step": 7}')
    with reader_for("hf-trainer", {}).open(tmp_path) as h:  # not transposed twice
        np.testing.assert_array_equal(h.read_tensor(name), sd[name].T)
    (tmp_path / "config.json").write_text('{"_class_name": "NotTransformers"}')
    with reader_for("safetensors", {}).open(tmp_path / "model.safetensors") as h:
        assert getattr(h.list_tensors()[name], "orientation", "default") == "default"
        np.testing.assert_array_equal(h.read_tensor(name), sd[name])
