"""The optimizer a checkpoint was trained with: its family, hyper-parameters and how they were told.

An optimizer ``state_dict()`` has ``param_groups`` (``lr``, ``momentum``,
``betas``, ``weight_decay``, ...) and per-parameter buffers, but no class
name: the family is inferred from those keys
(:func:`optimizer_family`) and the record says
which keys decided it. Sources: a ``torch.save`` dict's ``optimizer`` entry,
Lightning's ``optimizer_states``, and a Hugging Face Trainer directory's
``optimizer.pt`` (loaded with ``torch.load(weights_only=True)``: an untrusted
file never runs code). The VC family's identities hold for plain SGD steps
only (MATH.md); :func:`sgd_check` says whether a run's steps were such.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

__all__ = [
    "HF_OPTIMIZER_FILE",
    "OptimizerInfo",
    "describe_state",
    "find_optimizer_state",
    "optimizer_family",
    "hf_optimizer",
    "training_args",
    "manifest_check",
    "sgd_check",
    "sgd_warning",
]

#: Keys under which training scripts commonly store the optimizer's state dict, tried first.
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_states", "optim", "opt")
#: The optimizer state a ``transformers.Trainer`` checkpoint directory holds.
HF_OPTIMIZER_FILE = "optimizer.pt"
#: The pickled ``TrainingArguments`` beside it: read by parsing opcodes, never unpickled.
HF_ARGS_FILE = "training_args.bin"
#: ``TrainingArguments`` fields read from it (numbers, and ``optim``'s name).
_ARGS_NUMBERS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")
#: ``TrainingArguments.optim`` name prefixes -> the family they build.
_HF_FAMILIES = (
    ("adamw", "AdamW"),
    ("paged_adamw", "AdamW"),
    ("adam", "Adam"),
    ("adafactor", "Adafactor"),
    ("sgd", "SGD"),
    ("adagrad", "Adagrad"),
    ("rmsprop", "RMSprop"),
    ("lion", "Lion"),
    ("paged_lion", "Lion"),
)

#: param_group options kept as hyper-parameters (the others are implementation switches).
_HYPER = (
    "lr",
    "momentum",
    "dampening",
    "nesterov",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "decoupled_weight_decay",
    "alpha",
    "centered",
    "rho",
    "lr_decay",
    "momentum_decay",
    "maximize",
)

#: Keys whose presence decides the family (named in ``inferred_from``).
_TELLING = (
    "betas",
    "amsgrad",
    "decoupled_weight_decay",
    "momentum",
    "nesterov",
    "alpha",
    "centered",
    "rho",
    "lr_decay",
    "momentum_decay",
    "etas",
)


@dataclass(frozen=True, slots=True)
class OptimizerInfo:
    """One checkpoint's optimizer: ``family`` (empty when unknown), hyper-parameters, evidence."""

    family: str
    params: dict[str, Any] = field(default_factory=dict)
    inferred_from: str = ""
    source: str = ""

    def to_json(self) -> str:
        """The ``/steps.optimizer_params`` value: hyper-parameters, evidence and source."""
        return json.dumps(
            {**self.params, "inferred_from": self.inferred_from, "source": self.source},
            sort_keys=True,
        )


def _plain(value: Any) -> Any:
    """A JSON-able copy of an option (tuples as lists, one-element tensors as numbers)."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "numel", lambda: 0)() == 1:
        return item()
    return str(value)


def _is_optimizer_state(node: Any) -> TypeGuard[Mapping]:
    return isinstance(node, Mapping) and "param_groups" in node and "state" in node


def find_optimizer_state(obj: Mapping) -> Mapping | None:
    """The first optimizer ``state_dict()`` stored in a checkpoint dict, if any."""
    candidates = [obj.get(key) for key in _OPTIMIZER_KEYS] + list(obj.values())
    for node in candidates:
        if isinstance(node, list | tuple) and node:
            node = node[0]
        if _is_optimizer_state(node):
            return node
    return None


def optimizer_family(state: Mapping) -> str | None:
    """Name of the ``torch.optim`` class that wrote an optimizer ``state_dict()``.

    Inferred from the per-parameter buffers and the param-group options; None
    when they match no built-in optimizer.
    """
    groups = state.get("param_groups") or [{}]
    group = groups[0] if isinstance(groups[0], Mapping) else {}
    buffers: set[str] = set()
    for per_param in (state.get("state") or {}).values():
        if isinstance(per_param, Mapping):
            buffers.update(per_param)
    if "mu_product" in buffers or "momentum_decay" in group:
        return "NAdam"
    if "exp_inf" in buffers:
        return "Adamax"
    if "exp_avg" in buffers or "betas" in group:
        if "amsgrad" in group:
            # Adam and AdamW share buffers and options; only recent PyTorch records the flag.
            decoupled: Any = group.get("decoupled_weight_decay")
            return {True: "AdamW", False: "Adam"}.get(decoupled, "Adam/AdamW")
        # Without amsgrad: RAdam records the flag; older RAdam and SparseAdam look alike.
        return "RAdam" if "decoupled_weight_decay" in group else None
    if "acc_delta" in buffers or "rho" in group and "alpha" not in group:
        return "Adadelta"
    if "square_avg" in buffers or "alpha" in group and "centered" in group:
        return "RMSprop"
    if "sum" in buffers or "lr_decay" in group:
        return "Adagrad"
    if "momentum_buffer" in buffers or "nesterov" in group:
        return "SGD"
    if "etas" in group:
        return "Rprop"
    return None


def describe_state(state: Mapping, source: str) -> OptimizerInfo:
    """The family and hyper-parameters of an optimizer ``state_dict()`` read from ``source``."""
    groups = state.get("param_groups") or [{}]
    group = groups[0] if isinstance(groups[0], Mapping) else {}
    family = optimizer_family(state) or ""
    buffers: set[str] = set()
    for per_param in (state.get("state") or {}).values():
        if isinstance(per_param, Mapping):
            buffers.update(str(k) for k in per_param)
    keys = [k for k in _TELLING if k in group]
    if "decoupled_weight_decay" in group:
        keys[keys.index("decoupled_weight_decay")] = (
            f"decoupled_weight_decay={bool(group['decoupled_weight_decay'])}"
        )
    evidence = f"param_groups keys {', '.join(keys) or 'none telling'}"
    if buffers:
        evidence += f"; state buffers {', '.join(sorted(buffers))}"
    if family == "Adam/AdamW":
        evidence += " (no decoupled_weight_decay flag: Adam and AdamW look alike)"
    params = {k: _plain(group[k]) for k in _HYPER if k in group}
    if len(groups) > 1:
        params["param_groups"] = len(groups)
    return OptimizerInfo(family, params, evidence, source)


def hf_optimizer(directory: str | os.PathLike) -> OptimizerInfo | None:
    """The optimizer of a Trainer checkpoint directory (None: neither file there).

    ``optimizer.pt`` is loaded with ``torch.load(weights_only=True)``;
    ``training_args.bin`` is read by parsing its pickle's opcodes (its
    ``optim`` name settles Adam against AdamW when the state cannot). A file
    that cannot be read leaves the family empty with the reason: the weights
    are still the step's.
    """
    state_info = _hf_state(Path(directory) / HF_OPTIMIZER_FILE)
    args = training_args(Path(directory) / HF_ARGS_FILE)
    if args is None or not args.get("optim"):
        return state_info
    optim = str(args["optim"])
    family = next((f for prefix, f in _HF_FAMILIES if optim.startswith(prefix)), optim)
    told = f"{HF_ARGS_FILE} optim={optim}"
    if state_info is None or not state_info.params:
        params = {
            k: v
            for k, v in (
                ("lr", args.get("learning_rate")),
                (
                    "betas",
                    [args["adam_beta1"], args["adam_beta2"]] if "adam_beta2" in args else None,
                ),
                ("eps", args.get("adam_epsilon")),
                ("weight_decay", args.get("weight_decay")),
            )
            if v is not None and (k in ("lr", "weight_decay") or family in ("Adam", "AdamW"))
        }
        return OptimizerInfo(family, params, told, HF_ARGS_FILE)
    if state_info.family in ("", "Adam/AdamW"):
        return OptimizerInfo(
            family, state_info.params, f"{told}; {state_info.inferred_from}", state_info.source
        )
    return OptimizerInfo(
        state_info.family,
        state_info.params,
        f"{state_info.inferred_from}; {told}",
        state_info.source,
    )


def _hf_state(path: Path) -> OptimizerInfo | None:
    """``optimizer.pt``, loaded safely (None: no file; an empty family: unreadable)."""
    if not path.is_file():
        return None
    from gramlin_analyze.io.torch_pickle import load_torch_file

    try:
        state = load_torch_file(path)
    except Exception as err:  # any failure: the optimizer stays unknown, the step is still read
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        return OptimizerInfo("", {}, f"{path.name} unreadable: {why}", str(path))
    if not (isinstance(state, Mapping) and "param_groups" in state):
        return OptimizerInfo("", {}, f"{path.name} holds no optimizer state_dict", str(path))
    return describe_state(state, HF_OPTIMIZER_FILE)


def training_args(path: str | os.PathLike, *, limit: int = 1 << 20) -> dict[str, Any] | None:
    """``optim`` and the optimizer numbers of a pickled ``TrainingArguments`` (None: no file).

    Its opcodes are parsed with :mod:`pickletools` (nothing is imported or
    called): a key's value is the number or name pushed right after it.
    Unreadable or unexpected content gives what could be read, maybe nothing.
    """
    import pickletools
    import zipfile

    from gramlin_analyze.io.pickle_scan import pickle_bytes

    p = Path(path)
    if not p.is_file():
        return None
    try:
        with p.open("rb") as f:
            data = pickle_bytes(f, zipped=zipfile.is_zipfile(p), limit=limit)
        pushed = [
            (op.name, arg)
            for op, arg, _ in pickletools.genops(data)
            if arg is not None
            and "PUT" not in op.name
            and "GET" not in op.name
            and op.name not in ("FRAME", "PROTO")
        ]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return {}
    return _args_from(pushed)


def _args_from(pushed: list[tuple[str, Any]]) -> dict[str, Any]:
    """The wanted fields of a ``TrainingArguments`` from its pickle's pushed values, in order."""
    out: dict[str, Any] = {}
    for i, (_, arg) in enumerate(pushed[:-1]):
        op, value = pushed[i + 1]
        if arg in _ARGS_NUMBERS and ("FLOAT" in op or "INT" in op):
            out[arg] = float(value)
        elif arg == "optim" and (op == "GLOBAL" or "." in str(value)):
            # the enum's class (GLOBAL, or module and name strings for STACK_GLOBAL), then its value
            names = [a for _, a in pushed[i + 1 : i + 5] if isinstance(a, str)]
            name = next((a for a in names if a.replace("_", "").isalnum() and a.islower()), None)
            if name is not None:
                out["optim"] = name
    return out


def _is_plain_sgd(family: str, params: Mapping[str, Any]) -> bool:
    return (
        family == "SGD"
        and not params.get("momentum")
        and not params.get("weight_decay")
        and not params.get("maximize")
    )


def _label(family: str, params: Mapping[str, Any]) -> str:
    """``AdamW (betas [0.9, 0.999], weight_decay 0.01)``: the family and what makes it non-plain."""
    shown = [
        f"{k} {params[k]}"
        for k in ("momentum", "nesterov", "betas", "weight_decay")
        if params.get(k) not in (None, 0, 0.0, False)
    ]
    return f"{family} ({', '.join(shown)})" if shown else family


def sgd_check(rows: Iterable[tuple[str, str]]) -> tuple[str, str | None]:
    """``(optimizer_check, warning)`` for the ``(optimizer, optimizer_params)`` of a run's ok steps.

    ``optimizer_check`` is ``"plain SGD"``, ``"unknown"`` (no checkpoint
    recorded an optimizer) or what else the run used; ``warning`` names what
    the run used when some step was not plain SGD (None otherwise).
    """
    seen: dict[str, None] = {}
    known = other = 0
    for family, params_json in rows:
        if not family:
            continue
        known += 1
        try:
            params = json.loads(params_json) if params_json else {}
        except ValueError:
            params = {}
        if not _is_plain_sgd(family, params):
            other += 1
            seen[_label(family, params)] = None
    if not known:
        return "unknown", None
    if not other:
        return "plain SGD", None
    used = "; ".join(seen)
    return f"not plain SGD: {used} at {other} of {known} recorded steps", used


def sgd_warning(used: str, names: Iterable[str] = ()) -> str:
    """The one line ``analyze`` and ``info`` show when a run used another optimizer than plain SGD."""
    shown = ", ".join(names) or "the vc family (VC, VCS, interval consistency, FLE residual)"
    return (
        f"{shown} assume plain SGD steps; this run used {used}: they describe the virtual SGD "
        "step with the recorded lr, not the steps taken (docs/metrics.md, Other optimizers)"
    )


def manifest_check(man: Mapping[str, Any]) -> tuple[str, str | None]:
    """:func:`sgd_check` over the ``ok`` rows of a ``/steps`` manifest (columns by name)."""
    n = len(man["step"])
    params = man.get("optimizer_params", [""] * n)
    optim = man.get("optimizer", [""] * n)
    return sgd_check(
        (str(o or ""), str(p or ""))
        for o, p, st in zip(optim, params, man["status"], strict=True)
        if st == "ok"
    )
