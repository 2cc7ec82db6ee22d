"""The recorder's core, shared by the plain loop, Lightning and Hugging Face: hooks and steps.

Per selected layer a forward pre-hook hands the module an alias of its input when the
input needs a gradient: backward then delivers ``g = W^T dL/dz`` (through this layer only)
at no extra cost. Otherwise a hook on the output ``z`` forms ``g = dL/dz W``, or keeps only
``sum_i dz_i dz_i^T`` where that is cheaper (narrow outputs; ``LayerSums.plan``). An optimizer
step pre-hook turns the step's products into the running sums (``terms.py``). Only training
forwards with gradients count; a forward that finds the weight's ``.grad`` empty starts a
new accumulation cycle (so a GradScaler step skipped for inf/NaN leaves nothing behind).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gramlin_analyze.errors import UsageError
from gramlin_analyze.record.layers import RecordLayer, find_layers
from gramlin_analyze.record.terms import LayerSums

__all__ = ["RecordCore"]


class RecordCore:
    """Hooks on ``model``'s layers and, optionally, on optimizers' steps; see :class:`Recorder`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str] | None = None,
        mode: str | Mapping[str, str] = "auto",
        full_max: int = 1024,
        sgd_terms: bool | None = None,
        compute_dtype: torch.dtype | None = None,
        scaler: Any = None,
        data_parallel: bool | None = None,
    ) -> None:
        _refuse_compiled(model)
        self.model = model
        self.scaler = scaler
        self.data_parallel = data_parallel
        self.layers = find_layers(_unwrap(model), layers=layers, mode=mode, full_max=full_max)
        self.sums = {
            layer.name: LayerSums(
                layer,
                sgd=(layer.mode == "diag") if sgd_terms is None else sgd_terms,
                compute_dtype=compute_dtype,
            )
            for layer in self.layers
        }
        self.optimizers: list[torch.optim.Optimizer] = []
        self._groups: dict[str, dict] = {}
        self._groups_key: tuple = ()
        self.step_count = 0
        self.lr_trace: list[tuple[int, list[float]]] = []
        self._handles: list[Any] = []
        for layer in self.layers:
            self._handles.append(
                layer.module.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True)
            )

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, *, hook: bool = True) -> None:
        """Take learning rates from ``optimizer`` and, with ``hook``, record at its every ``step()``.

        The step pre-hook sees final gradients and unmoved weights, unless the step runs a
        closure (Lightning's automatic optimization, LBFGS): those callers record by hand.
        """
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate/Lightning wrappers
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"cannot hook {type(optimizer).__name__}: not a torch.optim.Optimizer")
        if any(o is optimizer for o in self.optimizers):
            return
        self.optimizers.append(optimizer)
        if hook:
            self._handles.append(optimizer.register_step_pre_hook(lambda opt, *a: self.step()))

    def close(self) -> None:
        """Remove every hook; the sums stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- forward and backward -------------------------------------------------------

    def _active(self, module: nn.Module) -> bool:
        if not (module.training and torch.is_grad_enabled()):
            return False
        if torch.compiler.is_compiling():
            raise UsageError(
                "gramlin record: a recorded layer runs inside torch.compile; its hooks need eager "
                "autograd. Record an eager run, or compile only modules the recorder does not follow"
            )
        return True

    def _pre_hook(self, layer: RecordLayer) -> Callable[..., Any]:
        sums = self.sums[layer.name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if not self._active(module):
                return None
            h = args[0] if args else kwargs.get("input")
            if not isinstance(h, torch.Tensor):
                return None
            self._check_scaler(h)
            if layer.param.grad is None:
                sums.reset()
            free_g = h.requires_grad and _plain(module, layer)
            sums.plan(h.numel() // max(h.shape[-1], 1), free_g=free_g)
            keep_h = h.detach() if sums.needs_h() else None
            if free_g and sums.second == "g":
                alias = h.view_as(h)
                alias.register_hook(lambda g: sums.add_samples(g.detach(), keep_h) and None)
                return ((alias, *args[1:]), kwargs) if args else (args, {**kwargs, "input": alias})
            module_hook: list[Any] = []

            def out_hook(mod: nn.Module, a: tuple, kw: dict, z: torch.Tensor) -> None:
                module_hook.pop().remove()
                if isinstance(z, torch.Tensor) and z.requires_grad:
                    z.register_hook(lambda dz: self._from_dz(layer, dz, keep_h))

            module_hook.append(module.register_forward_hook(out_hook, with_kwargs=True))
            return None

        return hook

    def _from_dz(self, layer: RecordLayer, dz: torch.Tensor, h: torch.Tensor | None) -> None:
        sums = self.sums[layer.name]
        dz = dz.detach().reshape(-1, dz.shape[-1]).to(sums.dtype)
        if sums.second == "dz":
            sums.add_dz(dz)
        else:
            sums.add_samples(dz @ layer.weight(sums.dtype), h)

    def _check_scaler(self, h: torch.Tensor) -> None:
        device = h.device.type
        if self.scaler is not None or not torch.is_autocast_enabled(device):
            return
        if torch.get_autocast_dtype(device) == torch.float16:
            raise UsageError(
                "gramlin record: float16 autocast without a GradScaler given to the recorder; "
                "the per-sample gradients are of the scaled loss. Pass scaler=<your GradScaler> "
                "(the Lightning and Hugging Face callbacks find it themselves)"
            )

    # -- optimizer step -------------------------------------------------------------

    def step(self, lr: float | Mapping[str, float] | None = None) -> None:
        """Add this optimizer step's terms; ``lr`` only when no optimizer is attached."""
        lrs = self._layer_lrs(lr)
        ranks = self._ranks()
        if ranks > 1:
            self._all_reduce()
        scale = self._scale()
        if scale != 1.0 and not self._finite():
            for sums in self.sums.values():  # GradScaler will skip this step
                sums.reset()
            return
        for name, sums in self.sums.items():
            sums.step(lrs[name], scale=scale, ranks=ranks)
        self.step_count += 1
        groups = [float(g["lr"]) for o in self.optimizers for g in o.param_groups] or sorted(
            set(lrs.values())
        )
        if not self.lr_trace or self.lr_trace[-1][1] != groups:
            self.lr_trace.append((self.step_count, groups))

    def _layer_lrs(self, lr: float | Mapping[str, float] | None) -> dict[str, float]:
        if lr is not None:
            if isinstance(lr, Mapping):
                return {name: float(lr[name]) for name in self.sums}
            return dict.fromkeys(self.sums, float(lr))
        if not self.optimizers:
            raise UsageError("gramlin record: step() needs lr= when no optimizer is attached")
        return {name: float(group["lr"]) for name, group in self._layer_groups().items()}

    def _layer_groups(self) -> dict[str, dict]:
        """Each layer's optimizer param group, looked up again only when groups are added
        (a scheduler changes ``group["lr"]``, read at every step; the lookup walks every
        parameter of the model)."""
        key = tuple((id(o), len(o.param_groups)) for o in self.optimizers)
        if self._groups_key != key:
            found: dict[int, dict] = {}
            for opt in self.optimizers:
                for group in opt.param_groups:
                    for p in group["params"]:
                        found[id(p)] = group
            missing = [layer.name for layer in self.layers if id(layer.param) not in found]
            if missing:
                raise UsageError(
                    f"gramlin record: no optimizer holds the weights of layers {missing}"
                )
            self._groups = {layer.name: found[id(layer.param)] for layer in self.layers}
            self._groups_key = key
        return self._groups

    def _scale(self) -> float:
        scaler = self.scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return 1.0
        return float(scaler.get_scale())

    def _finite(self) -> bool:
        """Whether every recorded weight's gradient is finite (one sync per step, scaler only)."""
        grads = [s.layer.param.grad for s in self.sums.values() if s.layer.param.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _ranks(self) -> int:
        if self.data_parallel is False or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size()

    def _all_reduce(self) -> None:
        """One all-reduce per step of every layer's per-sample products (global batch)."""
        parts = [sums.local_buffers() for sums in self.sums.values()]
        sizes = [sum(t.numel() for t in p) for p in parts]
        flat = torch.cat([t for p in parts for t in p])
        if dist.get_backend() == "nccl" and not flat.is_cuda:
            flat = flat.cuda()
        dist.all_reduce(flat)
        offset = 0
        for sums, size in zip(self.sums.values(), sizes, strict=True):
            sums.set_buffers(flat[offset : offset + size].to(sums.device))
            offset += size

    @property
    def is_writer(self) -> bool:
        """Whether this process writes records (rank 0, or no process group)."""
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP/DataParallel wrappers (names are normalized anyway)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _refuse_compiled(model: nn.Module) -> None:
    compiled = [n or "<model>" for n, m in model.named_modules() if _is_compiled(m)]
    if compiled or _is_compiled(model):
        raise UsageError(
            f"gramlin record: torch.compile-d module(s) {compiled or ['<model>']}; the recorder's "
            "hooks need eager autograd. Attach it to the eager model and train that model "
            "(compile after recording is not supported)"
        )


def _is_compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def _plain(module: nn.Module, layer: RecordLayer) -> bool:
    """Whether the module's call is its class's own forward, so the input's gradient is ``W^T dz``."""
    if "forward" in vars(module):
        return False
    if layer.transposed:
        return True
    return type(module).forward is nn.Linear.forward
