"""Bad input to the engine: each error names its class and the thing to fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gramlin_analyze.capture import capture_layers, capture_step, make_probe, sample_counts
from gramlin_analyze.errors import ModelError, ProbeError, UsageError


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _probe(rng, d=4, n=9):
    return make_probe(rng.normal(size=(n, d)), labels=rng.integers(0, 3, n))


def test_probe_of_wrong_shape(rng):
    with pytest.raises(ProbeError) as err:
        capture_step(_mlp(), _probe(rng, d=5), loss="cross_entropy", sink=None)
    msg = str(err.value)
    assert "per sample (5,)" in msg and "'0' expects in_features=4" in msg
    with pytest.raises(ProbeError, match="in_features=4"):
        sample_counts(_mlp(), _probe(rng, d=5))


def test_nan_loss_names_the_step(rng):
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"loss is nan at step 700 on probe samples 0\.\.3"):
        capture_step(model, _probe(rng), loss="cross_entropy", sink=None, step=700, batch_size=4)


def test_layer_glob_matching_nothing_lists_the_layers(rng):
    with pytest.raises(UsageError) as err:
        capture_step(_mlp(), _probe(rng), loss="cross_entropy", sink=None, layers=["fc*", "0"])
    assert "['fc*']" in str(err.value) and "available: ['0', '2']" in str(err.value)
    with pytest.raises(UsageError, match="list of globs"):
        capture_layers(_mlp(), layers="0")


def test_layer_globs_select(rng, collector):
    capture_step(_mlp(), _probe(rng), loss="cross_entropy", sink=collector, layers=["2"])
    assert set(collector.parts) == {"2"}


def test_labels_beyond_the_outputs(rng):
    probe = make_probe(rng.normal(size=(5, 4)), labels=np.array([0, 1, 7, 2, 1]))
    with pytest.raises(ProbeError, match="labels go up to 7 but the model has 3 outputs"):
        capture_step(_mlp(), probe, loss="cross_entropy", sink=None)


class Scale(nn.Module):
    """A module with a 2-D weight that is not a linear map of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.sum()


class Custom(nn.Module):
    """F.linear in a custom module: capturable only when named by extra_layers."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


def test_extra_layers(rng, collector):
    model = nn.Sequential(Custom(), nn.Tanh(), nn.Linear(3, 3)).double()
    probe = _probe(rng)
    capture_step(model, probe, loss="cross_entropy", sink=collector, extra_layers=["0"])
    assert set(collector.parts) == {"2", "0"}
    # Layer globs select among standard and extra layers alike.
    assert [layer.name for layer in capture_layers(model, layers=["0"], extra_layers=["0"])] == [
        "0"
    ]
    with pytest.raises(UsageError, match="extra layer glob"):
        capture_layers(model, extra_layers=["nothing*"])
    bad = nn.Sequential(Scale(), nn.Linear(4, 3))
    with pytest.raises(ModelError, match="does not compute h @ weight.T"):
        capture_step(bad, probe, loss="cross_entropy", sink=None, extra_layers=["0"])


def test_grouped_convolution_and_reuse_refused(rng):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ModelError, match="grouped convolution.*groups=2"):
        capture_layers(model)
    assert [layer.name for layer in capture_layers(model, layers=["2"])] == ["2"]

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(torch.tanh(self.fc(x))))

    with pytest.raises(ModelError, match="'fc' runs more than once"):
        capture_step(Tied(), _probe(rng), loss="cross_entropy", sink=None)


def test_half_precision_model_and_bad_options(rng):
    with pytest.raises(ModelError, match=r"model.float\(\)"):
        capture_step(_mlp().half(), _probe(rng), loss="cross_entropy", sink=None)
    with pytest.raises(UsageError, match="pool"):
        capture_step(_mlp(), _probe(rng), loss="cross_entropy", sink=None, pool="max")
    with pytest.raises(UsageError, match="batch_size"):
        capture_step(_mlp(), _probe(rng), loss="cross_entropy", sink=None, batch_size=0)
