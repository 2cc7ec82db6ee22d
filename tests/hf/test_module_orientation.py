"""Conv1D orientation from the model source: research code reusing GPT-2 blocks, saved
with a plain ``torch.save`` (no config.json), ingested with ``--model file.py:build``.
Weights are compared bit for bit with the saved state in ``(out, in)``, Grams with
``W^T W`` and ``g`` with ``W^T dL/dz`` by autograd, both in float64."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
import xarray as xr  # noqa: E402

import gramlin_analyze as ga  # noqa: E402
from gramlin_analyze.cli import main  # noqa: E402
from gramlin_analyze.io.base import TensorInfo  # noqa: E402
from gramlin_analyze.io.hf_conventions import conventions_for  # noqa: E402
from gramlin_analyze.store.validate import validate_store  # noqa: E402

FACTORY = '''
import torch
import transformers


class Net(torch.nn.Module):
    """GPT-2 blocks under a classifier head, as research code reuses them."""

    def __init__(self):
        super().__init__()
        config = transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
            bos_token_id=0, eos_token_id=0, use_cache=False,
        )
        self.gpt = transformers.GPT2Model(config)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, ids):
        return self.head(self.gpt(ids).last_hidden_state.mean(dim=1))


def build():
    return Net()
'''

CONV1D = ("gpt.h.0.attn.c_attn", "gpt.h.0.attn.c_proj", "gpt.h.0.mlp.c_fc", "gpt.h.0.mlp.c_proj")
FIRST, LATER = (1, 2), 3


def _factory(path):
    spec = importlib.util.spec_from_file_location("module_orientation_factory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _save_step(run, factory, step: int) -> None:
    """A DDP-style ``torch.save`` of the state dict (``module.`` prefix), random per step."""
    torch.manual_seed(100 + step)
    state = factory.build().state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, run / f"step_{step}.pt")


def _state(run, step: int) -> dict[str, torch.Tensor]:
    saved = torch.load(run / f"step_{step}.pt", weights_only=True)
    return {k.removeprefix("module."): v for k, v in saved.items()}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """Two steps ingested with capture, a third later with no flags, then analyzed."""
    tmp = tmp_path_factory.mktemp("module_orientation")
    (tmp / "factory.py").write_text(FACTORY)
    factory = _factory(tmp / "factory.py")
    run = tmp / "run"
    run.mkdir()
    for step in FIRST:
        _save_step(run, factory, step)
    rng = np.random.default_rng(7)
    probe = tmp / "probe.npz"
    np.savez(probe, inputs=rng.integers(0, 50, (6, 8)), labels=rng.permutation([0, 1, 2, 3, 4, 0]))
    store = tmp / "s.zarr"
    model = f"{tmp / 'factory.py'}:build"
    args = ["ingest", str(run), "--store", str(store), "--probe", str(probe), "--model", model]
    assert main([*args, "-q"]) == 0
    _save_step(run, factory, LATER)
    report = ga.ingest(run, store)  # no capture flags: the store's settings
    assert report.ingested == [LATER] and not report.failed
    assert main(["analyze", str(store), "-q"]) == 0
    assert validate_store(store) == []  # orientation_source "module" is in the schema
    return run, probe, factory, xr.open_datatree(str(store), engine="zarr")


def test_conv1d_stored_out_in_with_bias_from_the_module(ingested):
    run, _, _, tree = ingested
    for step in (*FIRST, LATER):
        state = _state(run, step)
        for name in CONV1D:
            node = tree[f"layers/{name}"]
            assert node.attrs["orientation_source"] == "module", name
            assert node.attrs["has_bias"], name
            ds = node.to_dataset().sel(step=step)
            w = state[f"{name}.weight"].numpy()
            np.testing.assert_array_equal(ds["weight"].values, w.T, err_msg=name)
            np.testing.assert_array_equal(ds["bias"].values, state[f"{name}.bias"].numpy())
        head = tree["layers/head"]
        assert head.attrs["orientation_source"] == "default"  # a Linear: nothing turned
        np.testing.assert_array_equal(
            head["weight"].sel(step=step).values, state["head.weight"].numpy()
        )
    assert tree["layers/gpt.h.0.attn.c_attn"]["weight"].shape[1:] == (48, 16)


def test_gram_is_wtw_of_the_effective_weight(ingested):
    run, _, _, tree = ingested
    for step in (*FIRST, LATER):
        state = _state(run, step)
        for name in CONV1D:
            W = state[f"{name}.weight"].double().numpy().T  # Conv1D: (in, out) -> (out, in)
            gram = tree[f"metrics/{name}"]["gram"].sel(step=step).values
            np.testing.assert_allclose(gram, W.T @ W, rtol=1e-6, atol=1e-9, err_msg=name)


def _autograd(factory, state, probe, names):
    """Per layer: input rows ``h`` and ``g = W^T dL/dz`` (``W`` the module's ``(out, in)``)."""
    model = factory.build()
    model.load_state_dict(state)
    model = model.double().eval()
    modules = dict(model.named_modules())
    seen = {}
    hooks = [
        modules[n].register_forward_hook(lambda m, a, z, n=n: seen.__setitem__(n, (a[0], z)))
        for n in names
    ]
    data = np.load(probe)
    logits = model(torch.from_numpy(data["inputs"]))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(data["labels"]))
    dz = torch.autograd.grad(loss, [seen[n][1] for n in names])
    for h in hooks:
        h.remove()
    out = {}
    for n, d in zip(names, dz, strict=True):
        W = modules[n].weight.detach().numpy().T
        h = seen[n][0].detach().numpy()
        out[n] = (h.reshape(-1, h.shape[-1]), d.reshape(-1, d.shape[-1]).numpy() @ W)
    return out


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_captured_g_is_wt_dl_dz(ingested):
    run, probe, factory, tree = ingested
    for step in (FIRST[0], LATER):
        expected = _autograd(factory, _state(run, step), probe, CONV1D)
        for name in CONV1D:
            ds = tree[f"layers/{name}"].to_dataset().sel(step=step)
            h_ref, g_ref = expected[name]
            assert ds["input"].shape == h_ref.shape, name
            assert _rel(ds["input"].values, h_ref) < 1e-5, name
            assert _rel(ds["input_grad"].values, g_ref) < 1e-4, name


def test_without_a_model_the_raw_layout_is_stored_as_listed(ingested, tmp_path):
    run, _, _, _ = ingested
    store = tmp_path / "raw.zarr"
    assert main(["ingest", str(run), "--store", str(store), "-q"]) == 0
    tree = xr.open_datatree(str(store), engine="zarr")
    state = _state(run, FIRST[0])
    for name in CONV1D:
        node = tree[f"layers/{name}"]
        assert node.attrs["orientation_source"] == "default", name
        raw = state[f"{name}.weight"].numpy()  # (in, out): weights alone cannot tell
        np.testing.assert_array_equal(node["weight"].sel(step=FIRST[0]).values, raw)
    assert not tree["layers/gpt.h.0.attn.c_attn"].attrs["has_bias"]  # 48 != 16 rows


def test_module_layers_beside_a_config_that_misses_them():
    """``--model hf`` with a family list that lacks a module: the config turns what it
    knows ("config"), the model source the rest ("module"), nothing twice."""
    raw = {
        "h.0.attn.c_attn.weight": TensorInfo("h.0.attn.c_attn.weight", (16, 48), "float32"),
        "h.0.mlp.c_fc.weight": TensorInfo("h.0.mlp.c_fc.weight", (16, 64), "float32"),
        "h.0.mlp.c_fc.bias": TensorInfo("h.0.mlp.c_fc.bias", (64,), "float32"),
        "lm.weight": TensorInfo("lm.weight", (50, 16), "float32"),
    }
    conv = conventions_for({"model_type": "clvp"}, raw, ["h.0.attn.c_attn", "h.0.mlp.c_fc"])
    infos = conv.present(raw)
    assert infos["h.0.mlp.c_fc.weight"].orientation == "config"
    assert infos["h.0.attn.c_attn.weight"].orientation == "module"
    assert infos["h.0.attn.c_attn.weight"].shape == (48, 16)
    assert infos["h.0.mlp.c_fc.weight"].shape == (64, 16)
    assert infos["lm.weight"].orientation == "config" and infos["lm.weight"].shape == (50, 16)
    alone = conventions_for(None, raw, ["h.0.attn.c_attn"]).present(raw)
    assert alone["h.0.attn.c_attn.weight"].orientation == "module"
    assert alone["h.0.mlp.c_fc.weight"].orientation == "default"
    assert alone["h.0.mlp.c_fc.weight"].shape == (16, 64)


def teardown_module():
    sys.modules.pop("module_orientation_factory", None)
