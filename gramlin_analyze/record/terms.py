"""Per-layer sums: the per-sample products of one optimizer step, and the float64 running sums.

For one step with learning rate ``gamma``, effective weight ``W`` (``d_out x d_in``),
gradient ``G = dL/dW`` and per-sample ``g_i = W^T dL/dz_i`` (MATH.md):

- ``vcs_first  = -gamma (A + A^T)``, ``A = sum_i g_i h_i^T = W^T G`` (Feature Learning Equation);
- ``vcs_second = gamma^2 sum_i g_i g_i^T``; ``vcs = vcs_first + vcs_second``;
- ``sgd_second = gamma^2 G^T G``: ``vcs_first + sgd_second`` is the exact Gram change of a
  plain SGD step with this gradient;
- ``dgram = W^T W - W_0^T W_0``, the actual change since the recorder started (any optimizer).

``diag`` mode keeps the diagonals only, at ``O(samples d_in + d_out d_in)`` per step.
"""

from __future__ import annotations

import warnings

import torch

from gramlin_analyze.record.layers import RecordLayer

__all__ = ["LayerSums"]


class LayerSums:
    """One layer's step buffers (compute dtype) and running sums (float64, on the weight's device).

    ``route`` says how ``A = sum_i g_i h_i^T`` is formed in ``full`` mode: ``"wg"`` from the
    step's gradient (``W^T G``, ``d_out d_in^2``), ``"gh"`` from the per-sample products
    (``samples d_in^2``), chosen at the first backward by whichever costs less.
    """

    def __init__(self, layer: RecordLayer, *, sgd: bool, compute_dtype: torch.dtype | None):
        self.layer = layer
        self.sgd = sgd
        w = layer.param
        self.dtype = compute_dtype or (torch.float64 if w.dtype == torch.float64 else torch.float32)
        self.route = "wg" if layer.mode == "diag" else None
        shape = (layer.d_in,) if layer.mode == "diag" else (layer.d_in, layer.d_in)
        # "first_half" is sum_t -gamma A (diag: its diagonal); vcs_first = it + its transpose,
        # vcs = vcs_first + vcs_second, formed at save: two float64 adds per step, no transposes
        names = ["first_half", "vcs_second", *(["sgd_second"] if sgd else [])]
        self.sums = {q: torch.zeros(shape, dtype=torch.float64, device=w.device) for q in names}
        self.steps = 0
        self.samples = 0
        self.lr_sum = 0.0
        self.warned = False
        self.gram0 = self.gram()
        self.reset()

    @property
    def device(self) -> torch.device:
        return self.sums["first_half"].device

    def gram(self) -> torch.Tensor:
        """``W^T W`` (or its diagonal) of the current weight, in float64."""
        w = self.layer.weight(torch.float64)
        return (w * w).sum(0) if self.layer.mode == "diag" else w.t() @ w

    def reset(self) -> None:
        """Forget the per-sample products since the last step (a new accumulation cycle)."""
        self.gg: torch.Tensor | None = None
        self.gh: torch.Tensor | None = None
        self.rows = 0

    def add_samples(self, g: torch.Tensor, h: torch.Tensor | None) -> None:
        """Add one backward pass's rows ``g_i`` (and ``h_i`` for the ``gh`` route)."""
        g = g.reshape(-1, g.shape[-1]).to(self.dtype)
        if self.route is None:
            self.route = "gh" if g.shape[0] < self.layer.d_out else "wg"
        gg = (g * g).sum(0) if self.layer.mode == "diag" else g.t() @ g
        self.gg = gg if self.gg is None else self.gg + gg
        if self.route == "gh" and h is not None:
            gh = g.t() @ h.reshape(-1, h.shape[-1]).to(self.dtype)
            self.gh = gh if self.gh is None else self.gh + gh
        self.rows += g.shape[0]

    def needs_h(self) -> bool:
        """Whether the next backward needs the layer input (the ``gh`` route or undecided)."""
        return self.route != "wg"

    def local_buffers(self) -> list[torch.Tensor]:
        """The step's products to be summed over data-parallel ranks, flattened, float64."""
        shape = self.sums["first_half"].shape
        zero = torch.zeros(shape, dtype=torch.float64, device=self.sums["first_half"].device)
        gg = zero if self.gg is None else self.gg.double()
        gh = zero if self.gh is None or self.layer.mode == "diag" else self.gh.double()
        rows = torch.tensor([float(self.rows)], dtype=torch.float64, device=zero.device)
        return [gg.reshape(-1), gh.reshape(-1), rows]

    def set_buffers(self, flat: torch.Tensor) -> None:
        """Take back :meth:`local_buffers` after the all-reduce."""
        shape = self.sums["first_half"].shape
        n = self.sums["first_half"].numel()
        self.gg = flat[:n].reshape(shape)
        self.gh = flat[n : 2 * n].reshape(shape) if self.route == "gh" else None
        self.rows = int(round(float(flat[2 * n])))

    def step(self, lr: float, *, scale: float, ranks: int) -> bool:
        """Add this step's terms to the running sums; False when the weight has no gradient.

        ``scale`` is the loss scale of a GradScaler (per-sample gradients were taken of the
        scaled loss, ``G`` is unscaled); ``ranks`` the data-parallel world size whose
        gradients DDP averaged (each rank's ``dL/dz_i`` is ``ranks`` times the global one).
        """
        G = self.layer.grad(self.dtype)
        if G is None:
            self.reset()
            return False
        self._warn_unseen()
        W = self.layer.weight(self.dtype)
        per_sample = 1.0 / (scale * ranks)
        # products in the compute dtype; the running sums are float64 (in-place adds promote)
        if self.layer.mode == "diag":
            A = (W * G).sum(0)
            sgd = (G * G).sum(0) if self.sgd else None
        elif self.route == "gh" and self.gh is not None:
            A, sgd = self.gh * per_sample, G.t() @ G if self.sgd else None
        else:
            A, sgd = W.t() @ G, G.t() @ G if self.sgd else None
        self.sums["first_half"].add_(A, alpha=-lr)
        if self.gg is not None:
            self.sums["vcs_second"].add_(self.gg, alpha=(lr * per_sample) ** 2)
        if sgd is not None:
            self.sums["sgd_second"].add_(sgd, alpha=lr**2)
        self.steps += 1
        self.samples += self.rows
        self.lr_sum += lr
        self.reset()
        return True

    def _warn_unseen(self) -> None:
        """Once: a gradient with no forward seen means the weight is used without the module."""
        if self.rows == 0 and self.samples == 0 and not self.warned:
            self.warned = True
            warnings.warn(
                f"gramlin record: layer {self.layer.name!r} has a gradient but no forward of it "
                "was seen (its weight is used without calling the module?): vcs_second stays 0",
                RuntimeWarning,
                stacklevel=4,
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The running sums (and ``dgram`` now), float64 on CPU, keyed by quantity."""
        half = self.sums["first_half"]
        first = 2 * half if self.layer.mode == "diag" else half + half.t()
        out = {"vcs": first + self.sums["vcs_second"], "vcs_first": first}
        out.update((q, t) for q, t in self.sums.items() if q != "first_half")
        out = {q: t.detach().cpu().contiguous() for q, t in out.items()}
        out["dgram"] = (self.gram() - self.gram0).cpu().contiguous()
        out["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        out["samples"] = torch.tensor(self.samples, dtype=torch.int64)
        out["lr_sum"] = torch.tensor(self.lr_sum, dtype=torch.float64)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Resume the running sums from a saved record (the inverse of :meth:`tensors`)."""
        device = self.device
        own = {**tensors, "first_half": tensors["vcs_first"] / 2}
        for q in self.sums:
            if q in own:
                self.sums[q] = own[q].to(device=device, dtype=torch.float64).clone()
        self.gram0 = self.gram() - tensors["dgram"].to(device=device, dtype=torch.float64)
        self.steps = int(tensors["steps"])
        self.samples = int(tensors["samples"])
        self.lr_sum = float(tensors["lr_sum"])
