"""The layer template of a trajectory: which weights are layers, and their shapes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from gramlin_analyze.io.base import TensorInfo
from gramlin_analyze.io.names import common_wrapper_prefix, select_layers, split_param_name

__all__ = ["LayerSpec", "layers_of", "plan_layers", "check_against"]


@dataclass(frozen=True)
class LayerSpec:
    """One stored layer as a checkpoint presents it."""

    weight: str  # raw tensor name in this checkpoint
    bias: str | None
    shape: tuple[int, ...]  # (out, in, *kernel) as the reader returns it
    dtype: str
    # How (out, in) was decided: "config" (config.json's model_type), "module" (the
    # model source's module is a Conv1D) or "default" (the format's own convention).
    orientation_source: str = "default"
    tied_to: str | None = None  # the layer sharing this weight (a declared tie)

    def attrs(self) -> dict:
        """The layer attributes the checkpoint decides (orientation, tie)."""
        out: dict = {"orientation_source": self.orientation_source}
        if self.tied_to is not None:
            out["tied_to"] = self.tied_to
        return out


def layers_of(infos: dict[str, TensorInfo]) -> dict[str, LayerSpec]:
    """Every matrix-shaped weight of a checkpoint, by normalized layer name."""
    prefix = common_wrapper_prefix(infos)
    weights: dict[str, TensorInfo] = {}
    biases: dict[str, str] = {}
    for raw, info in infos.items():
        layer, role = split_param_name(raw, prefix)
        if role == "weight" and len(info.shape) >= 2 and 0 not in info.shape:  # (6, 0): no values
            weights[layer] = info
        elif role == "bias" and len(info.shape) == 1:
            biases[layer] = raw
    out = {}
    for layer, info in weights.items():
        b = biases.get(layer)
        if b is not None and infos[b].shape[0] != info.shape[0]:
            b = None
        tied = getattr(info, "tied_to", None)
        out[layer] = LayerSpec(
            info.name,
            b,
            tuple(info.shape),
            info.dtype,
            orientation_source=getattr(info, "orientation", "default"),
            tied_to=split_param_name(tied, prefix)[0] if tied else None,
        )
    return out


def plan_layers(
    listed: dict[int, dict[str, LayerSpec]],
    *,
    include: list[str] | None,
    exclude: list[str] | None,
) -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """The trajectory's layer template: ``layer -> (shape, dtype, has_bias)``.

    Shapes are decided by majority over checkpoints, so one odd checkpoint
    fails alone instead of redefining the run.
    """
    votes: Counter = Counter()
    first: dict[tuple, int] = {}
    for step, layers in sorted(listed.items()):
        chosen = select_layers(layers, include, exclude)
        sig = tuple(sorted((k, layers[k].shape, layers[k].bias is not None) for k in chosen))
        votes[sig] += 1
        first.setdefault(sig, step)
    if not votes:
        return {}
    best = max(votes, key=lambda s: (votes[s], -first[s]))
    dtypes: dict[str, str] = {}
    for _, layers in sorted(listed.items()):
        for name, _, _ in best:
            if name in layers and name not in dtypes:
                dtypes[name] = layers[name].dtype
    return {name: (shape, dtypes[name], has_bias) for name, shape, has_bias in best}


def check_against(layers: dict[str, LayerSpec], template: dict) -> str | None:
    for name, (shape, _, has_bias) in template.items():
        spec = layers.get(name)
        if spec is None:
            return f"layer {name!r} is missing (the other checkpoints have it)"
        if tuple(spec.shape) != tuple(shape):
            return (
                f"layer {name!r} has shape {tuple(spec.shape)} but the trajectory has {tuple(shape)}; "
                "this checkpoint belongs to another model: move it out of the run directory"
            )
        if has_bias and spec.bias is None:
            return f"layer {name!r} has no bias (the other checkpoints have one)"
    return None
