"""Model sources: factories, strict state-dict loading, TorchScript opt-in, rebuilt MLPs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from gramlin_analyze.capture import (
    capture_layers,
    load_factory,
    load_state_dict_strict,
    load_torchscript,
    rebuild_mlp,
)
from gramlin_analyze.errors import ModelError, UnsafeCheckpointError


def _write(tmp_path, body: str):
    path = tmp_path / "factory.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_factory_from_file_with_and_without_config(tmp_path):
    path = _write(
        tmp_path,
        """
        from torch import nn

        def build(config):
            return nn.Linear(config["d_in"], 2)

        def build_plain():
            return nn.Sequential(nn.Linear(3, 2))
        """,
    )
    model = load_factory(f"{path}:build", {"d_in": 7})
    assert isinstance(model, nn.Linear) and model.in_features == 7 and not model.training
    assert isinstance(load_factory(f"{path}:build_plain", {"ignored": 1}), nn.Sequential)


def test_factory_from_module():
    model = load_factory("torch.nn:Identity")
    assert isinstance(model, nn.Identity)


def test_factory_import_failure_names_the_spec(tmp_path):
    with pytest.raises(ModelError, match="no_such_pkg_gramlin.models:build"):
        load_factory("no_such_pkg_gramlin.models:build")
    with pytest.raises(ModelError, match="does not exist"):
        load_factory(f"{tmp_path / 'missing.py'}:build")
    broken = _write(tmp_path, "def build(:\n")
    with pytest.raises(ModelError, match="SyntaxError"):
        load_factory(f"{broken}:build")
    with pytest.raises(ModelError, match="has no attribute 'nope'"):
        load_factory("torch.nn:nope")
    with pytest.raises(ModelError, match="pkg.module:function"):
        load_factory("torch.nn")


def test_factory_returning_a_non_module(tmp_path):
    path = _write(
        tmp_path,
        """
        SIZE = 3

        def build():
            return {"weight": 1}

        def explode(config):
            raise KeyError("width")
        """,
    )
    with pytest.raises(ModelError, match=r"returned a dict, expected a torch.nn.Module"):
        load_factory(f"{path}:build")
    with pytest.raises(ModelError, match=r"SIZE.*not a callable"):
        load_factory(f"{path}:SIZE")
    with pytest.raises(ModelError, match=r"explode.*raised KeyError"):
        load_factory(f"{path}:explode")


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_state_dict_prefixes_on_either_side(rng):
    source = _net()
    tensors = {f"module.{k}": v.numpy() for k, v in source.state_dict().items()}
    target = _net()
    assert not load_state_dict_strict(target, tensors)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _net()

    wrapped = Wrapper()
    plain = {k: v.double() for k, v in source.state_dict().items()}  # cast to the model dtype
    load_state_dict_strict(wrapped, plain)
    torch.testing.assert_close(wrapped.model[0].weight, source[0].weight)


def test_state_dict_mismatch_diff():
    model = _net()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    del tensors["2.bias"]
    tensors["5.weight"] = torch.zeros(1)
    tensors["0.weight"] = torch.zeros(4, 5)
    with pytest.raises(ModelError) as err:
        load_state_dict_strict(model, tensors)
    msg = str(err.value)
    assert "missing from the checkpoint (1): 2.bias" in msg
    assert "not the model (1): 5.weight" in msg
    assert "0.weight model (4, 3) vs checkpoint (4, 5)" in msg
    # Non-strict tolerates names but never shapes.
    tensors["0.weight"] = torch.zeros(4, 3)
    diff = load_state_dict_strict(model, tensors, strict=False)
    assert diff.missing == ["2.bias"] and diff.unexpected == ["5.weight"]


def test_state_dict_diff_lists_at_most_ten():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(ModelError, match=r"missing from the checkpoint \(30\).*\(20 more\)"):
        load_state_dict_strict(model, {})


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_needs_explicit_opt_in(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(_net(), torch.ones(1, 3)), str(path))
    with pytest.raises(UnsafeCheckpointError, match="allow_code=True"):
        load_torchscript(path)
    loaded = load_torchscript(path, allow_code=True)
    assert [layer.name for layer in capture_layers(loaded)] == ["0", "2"]
    (tmp_path / "junk.pt").write_bytes(b"not an archive")
    with pytest.raises(ModelError, match="junk.pt"):
        load_torchscript(tmp_path / "junk.pt", allow_code=True)


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "sigmoid", "silu", "identity"])
def test_rebuild_mlp_forward_equals_original(rng, activation):
    act = {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "silu": nn.SiLU,
        "identity": nn.Identity,
    }[activation]
    original = nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 8), act(), nn.Linear(8, 3))
    tensors = {f"module.{k}": v.numpy() for k, v in original.state_dict().items()}
    rebuilt = rebuild_mlp(tensors, activation=activation)
    x = torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32))
    torch.testing.assert_close(rebuilt(x), original(x), rtol=0, atol=0)
    assert [layer.name for layer in capture_layers(rebuilt)] == ["0", "2", "4"]


def test_rebuild_mlp_keeps_nested_names_and_natural_order(rng):
    width = 4
    tensors = {}
    layers = [nn.Linear(width, width) for _ in range(12)]
    for i, layer in enumerate(layers):
        tensors[f"encoder.layers.{i}.weight"] = layer.weight.detach().double()
        tensors[f"encoder.layers.{i}.bias"] = layer.bias.detach().double()
    rebuilt = rebuild_mlp(tensors, activation="tanh")
    names = [layer.name for layer in capture_layers(rebuilt)]
    assert names == [f"encoder.layers.{i}" for i in range(12)]  # 10 and 11 after 9
    x = torch.from_numpy(rng.normal(size=(3, width)))
    ref = x
    for i, layer in enumerate(layers):
        ref = layer.double()(ref)
        ref = torch.tanh(ref) if i < 11 else ref
    torch.testing.assert_close(rebuilt(x), ref)
    assert rebuilt.encoder.layers.get_submodule("10") is rebuilt.get_submodule("encoder.layers.10")


def test_rebuild_mlp_orders_by_shapes_and_flattens_images(rng):
    first, second = nn.Linear(12, 5), nn.Linear(5, 2)
    tensors = {
        "b_in.weight": first.weight.detach(),
        "b_in.bias": first.bias.detach(),
        "a_out.weight": second.weight.detach(),
        "a_out.bias": second.bias.detach(),
    }
    rebuilt = rebuild_mlp(tensors, activation="relu")
    assert rebuilt.layer_names == ["b_in", "a_out"]
    x = torch.from_numpy(rng.normal(size=(4, 3, 2, 2)).astype(np.float32))
    torch.testing.assert_close(rebuilt(x), second(torch.relu(first(x.flatten(1)))))


def test_rebuild_mlp_refuses_what_is_not_a_chain():
    with pytest.raises(ModelError, match="2-D linear weights"):
        rebuild_mlp({"conv.weight": np.ones((2, 3, 3, 3), np.float32)})
    with pytest.raises(ModelError, match="do not form one chain"):
        rebuild_mlp({"a.weight": np.ones((3, 4)), "b.weight": np.ones((5, 6))})
    with pytest.raises(ModelError, match="unknown activation 'swish'"):
        rebuild_mlp({"a.weight": np.ones((3, 4))}, activation="swish")
    with pytest.raises(ModelError, match="neither a weight nor a bias"):
        rebuild_mlp({"a.weight": np.ones((3, 4)), "bn.running_mean": np.ones(3)})
