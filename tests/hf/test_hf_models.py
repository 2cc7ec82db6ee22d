"""Hugging Face models as people train them: GPT-2 (Conv1D, tied embeddings) and BERT,
trained with the Trainer, ingested with capture, analyzed, and checked against the
framework's own state_dict() and autograd in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import xarray as xr  # noqa: E402

from gramlin_analyze.capture.layers import eager_layers, is_hf_conv1d  # noqa: E402
from gramlin_analyze.cli import main  # noqa: E402
from gramlin_analyze.store.validate import validate_store  # noqa: E402
from tests.hf import trainer_runs as runs  # noqa: E402

STEPS = (2, 4)


def _linear_like(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_hf_conv1d(m)
    }


def _effective(module: torch.nn.Module) -> np.ndarray:
    """``W`` as ``(out, in)`` in float64, from the module itself (Conv1D: weight.T)."""
    w = module.weight.detach().double().numpy()
    return w.T if is_hf_conv1d(module) else w


def _reference(model, probe, modules):
    """Per layer: its input rows ``h`` and ``g = W^T dL/dz`` by autograd, in float64."""
    model = model.double().eval()
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, z, n=n: seen.__setitem__(n, (a[0], z)))
        for n, m in modules.items()
    ]
    data = np.load(probe)
    logits = model(torch.from_numpy(data["inputs"])).logits
    labels = torch.from_numpy(data["labels"])
    loss = torch.nn.functional.cross_entropy(logits.movedim(-1, 1), labels)
    names = list(modules)
    dz = torch.autograd.grad(loss, [seen[n][1] for n in names])
    for h in hooks:
        h.remove()
    out = {}
    for n, d in zip(names, dz, strict=True):
        h = seen[n][0].detach().numpy()
        rows = d.reshape(-1, d.shape[-1]).numpy()
        out[n] = (h.reshape(-1, h.shape[-1]), rows @ _effective(modules[n]))
    return out


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT-2 Trainer directory ingested with ``--model hf`` (no factory file) and analyzed."""
    tmp = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(runs.gpt2_config())
    run = runs.train(
        model, tmp / "run", runs.Examples(16, per_token=True, seed=1), steps=4, every=2
    )
    probe = runs.token_probe(tmp / "probe.npz", per_token=True, seed=2)
    store = tmp / "s.zarr"
    args = ["ingest", str(run), "--store", str(store), "--probe", str(probe), "--model", "hf"]
    assert main([*args, "-q"]) == 0
    assert main(["analyze", str(store), "-q"]) == 0
    assert validate_store(store) == []
    return run, probe, xr.open_datatree(str(store), engine="zarr")


def test_gpt2_every_linear_like_layer_stored_out_in_with_bias(gpt2):
    run, _, tree = gpt2
    for step in STEPS:
        ref = transformers.GPT2LMHeadModel.from_pretrained(run / f"checkpoint-{step}")
        sd = ref.state_dict()
        modules = _linear_like(ref)
        assert len([m for m in modules.values() if is_hf_conv1d(m)]) == 4 * runs.LAYERS
        for name, module in modules.items():
            ds = tree[f"layers/{name}"].to_dataset().sel(step=step)
            w = sd[f"{name}.weight"].numpy()
            expected = w.T if is_hf_conv1d(module) else w  # Conv1D keeps (in, out)
            assert ds["weight"].shape == expected.shape, name
            np.testing.assert_array_equal(ds["weight"].values, expected, err_msg=name)
            if module.bias is not None:
                np.testing.assert_array_equal(ds["bias"].values, sd[f"{name}.bias"].numpy())
            assert tree[f"layers/{name}"].attrs["orientation_source"] == "config"
    c_attn = tree["layers/transformer.h.0.attn.c_attn"]
    assert c_attn.attrs["has_bias"] and c_attn["weight"].shape[1:] == (3 * runs.EMBD, runs.EMBD)


def test_gpt2_tied_head_named_on_both_layers(gpt2):
    run, _, tree = gpt2
    assert "lm_head.weight" not in _saved_keys(run / "checkpoint-2")  # save_pretrained omits it
    head, wte = tree["layers/lm_head"], tree["layers/transformer.wte"]
    assert head.attrs["tied_to"] == "transformer.wte" and wte.attrs["tied_to"] == "lm_head"
    np.testing.assert_array_equal(head["weight"].values, wte["weight"].values)


def _saved_keys(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "np") as f:
        return set(f.keys())


def test_gpt2_capture_matches_autograd_and_gram_is_wtw(gpt2):
    run, probe, tree = gpt2
    for step in STEPS:
        ref = transformers.GPT2LMHeadModel.from_pretrained(run / f"checkpoint-{step}")
        modules = _linear_like(ref)
        expected = _reference(ref, probe, modules)
        for name, module in modules.items():
            ds = tree[f"layers/{name}"].to_dataset().sel(step=step)
            h_ref, g_ref = expected[name]
            assert ds["input"].shape == h_ref.shape, name
            assert _rel(ds["input"].values, h_ref) < 1e-5, name
            assert _rel(ds["input_grad"].values, g_ref) < 1e-4, name
            W = _effective(module)
            gram = tree[f"metrics/{name}"]["gram"].sel(step=step).values
            assert _rel(gram, W.T @ W) < 1e-6, name


def test_extra_layer_globs_cover_gpt2_blocks():
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(runs.gpt2_config())
    layers, _ = eager_layers(model, None, ["transformer.h.*"])
    by_name = {layer.name: layer for layer in layers}
    c_fc = by_name["transformer.h.1.mlp.c_fc"]
    assert c_fc.transposed and c_fc.weight_shape == (4 * runs.EMBD, runs.EMBD)
    assert "lm_head" in by_name and not by_name["lm_head"].transposed


def test_bert_factory_returns_the_hf_model_as_it_is(tmp_path):
    torch.manual_seed(5)
    model = transformers.BertForSequenceClassification(runs.bert_config())
    data = runs.Examples(8, per_token=False, seed=6)
    run = runs.train(model, tmp_path / "run", data, steps=2, every=2)
    probe = runs.token_probe(tmp_path / "probe.npz", per_token=False, seed=7)
    store = tmp_path / "s.zarr"
    factory = "tests.hf.trainer_runs:build_bert"
    args = ["ingest", str(run), "--store", str(store), "--probe", str(probe), "--model", factory]
    assert main([*args, "-q"]) == 0
    tree = xr.open_datatree(str(store), engine="zarr")
    ref = transformers.BertForSequenceClassification.from_pretrained(run / "checkpoint-2")
    sd = ref.state_dict()
    modules = _linear_like(ref)
    expected = _reference(ref, probe, modules)
    assert "classifier" in modules and "bert.encoder.layer.1.attention.self.query" in modules
    for name in modules:
        ds = tree[f"layers/{name}"].to_dataset().sel(step=2)
        np.testing.assert_array_equal(ds["weight"].values, sd[f"{name}.weight"].numpy())
        np.testing.assert_array_equal(ds["bias"].values, sd[f"{name}.bias"].numpy())
        h_ref, g_ref = expected[name]
        assert _rel(ds["input"].values, h_ref) < 1e-5, name
        assert _rel(ds["input_grad"].values, g_ref) < 1e-4, name
