"""Per-layer sums: the per-sample products of one optimizer step, and the float64 running sums.

For one step with learning rate ``gamma``, effective weight ``W`` (``d_out x d_in``),
gradient ``G = dL/dW`` and per-sample ``g_i = W^T dL/dz_i`` (MATH.md):

- ``vcs_first  = -gamma (A + A^T)``, ``A = sum_i g_i h_i^T = W^T G`` (Feature Learning Equation);
- ``vcs_second = gamma^2 sum_i g_i g_i^T``; ``vcs = vcs_first + vcs_second``;
- ``sgd_second = gamma^2 G^T G``: ``vcs_first + sgd_second`` is the exact Gram change of a
  plain SGD step with this gradient;
- ``dgram = W^T W - W_0^T W_0``, the actual change since the recorder started (any optimizer),
  formed only when the sums are read.

``diag`` mode keeps the diagonals only, at ``O(samples d_in + d_out d_in)`` per step.
"""

from __future__ import annotations

import warnings

import torch

from gramlin_analyze.record.layers import RecordLayer

__all__ = ["FLUSH_EVERY", "SYM_MIN", "LayerSums"]

# Steps summed in the compute dtype before one float64 add: a float64 add of a float32
# d_in x d_in matrix per step cost as much as a GEMM (docs/performance.md). 32 float32
# adds keep the rounding near that of one float32 product; float64 models add every step.
FLUSH_EVERY = 32
# From this width on, symmetric products (sum_i g_i g_i^T, W^T D W, G^T G) are formed as
# their top rows and bottom-right quarter: 3/4 of the multiply-adds; the bottom-left is
# filled from the top-right when the sums are read.
SYM_MIN = 256


class LayerSums:
    """One layer's step buffers (compute dtype) and running sums (float64, on the weight's device).

    Chosen at the first forward (:meth:`plan`), by multiply-add count, per layer:
    ``second`` says how ``sum_i g_i g_i^T`` is formed: ``"g"`` from the rows ``g_i``
    (``samples d_in^2``; ``g_i`` comes free from backward when the layer input needs a
    gradient), or ``"dz"`` as ``W^T D W`` with ``D = sum_i dz_i dz_i^T`` (``d_out d_in^2``: narrow
    outputs such as a classifier head); ``route`` says how ``A`` (diag: its diagonal) is
    formed: ``"wg"`` from the step's gradient (``W^T G``, ``d_out d_in^2``; diag ``d_out d_in``),
    or ``"gh"`` from the rows (``sum_i g_i h_i^T``, ``samples d_in^2``; diag ``samples d_in``)
    when there are fewer samples than outputs.
    """

    def __init__(
        self,
        layer: RecordLayer,
        *,
        sgd: bool,
        compute_dtype: torch.dtype | None,
        flush_every: int = FLUSH_EVERY,
    ):
        self.layer = layer
        self.sgd = sgd
        w = layer.param
        self.dtype = compute_dtype or (torch.float64 if w.dtype == torch.float64 else torch.float32)
        self.diag = layer.mode == "diag"
        self.route: str | None = None
        self.second: str | None = None
        self.free_g: bool | None = None
        shape = (layer.d_in,) if self.diag else (layer.d_in, layer.d_in)
        # "first_half" is sum_t -gamma A (diag: its diagonal); vcs_first = it + its transpose,
        # vcs = vcs_first + vcs_second, formed when read: no transposes per step
        names = ["first_half", "vcs_second", *(["sgd_second"] if sgd else [])]
        self.sums = {q: torch.zeros(shape, dtype=torch.float64, device=w.device) for q in names}
        exact = self.dtype == torch.float64
        self.flush_every = 1 if exact else max(1, int(flush_every))
        self.pending = (
            None
            if exact
            else {q: torch.zeros(shape, dtype=self.dtype, device=w.device) for q in names}
        )
        # diag terms of the step's gradient (diag(G^T G), diag(W^T G)) pile up elementwise,
        # d_out x d_in, and are summed over outputs at the flush: one fused pass over G per step
        self.pending_rows: dict[str, torch.Tensor] = {}
        self.pending_steps = 0
        self._bufs: dict[str, torch.Tensor] = {}
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
        return (w * w).sum(0) if self.diag else w.t() @ w

    def reset(self) -> None:
        """Forget the per-sample products since the last step (a new accumulation cycle)."""
        self.gg: torch.Tensor | None = None
        self.gh: torch.Tensor | None = None
        self.dd: torch.Tensor | None = None
        self.rows = 0
        self.kept: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.kept_rows = 0

    def plan(self, rows: int, *, free_g: bool) -> None:
        """Once, at the first forward: the cheaper ``second`` and ``route`` for ``rows`` samples."""
        if self.second is not None:
            return
        self.free_g = free_g
        o, i, b = self.layer.d_out, self.layer.d_in, max(int(rows), 1)
        g_cost = 0 if free_g else b * o * i
        if self.diag:
            from_rows, from_dz = g_cost + b * i, b * o * o + o * o * i + o * i
        else:
            from_rows = g_cost + b * i * i + min(b, o) * i * i
            from_dz = b * o * o + o * o * i + 2 * o * i * i
        self.second = "g" if from_rows <= from_dz else "dz"
        self.route = "gh" if self.second == "g" and b < o else "wg"

    def needs_h(self) -> bool:
        """Whether the next backward needs the layer input (the ``gh`` route)."""
        return self.route == "gh"

    def _mm(
        self,
        current: torch.Tensor | None,
        key: str,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        alpha: float = 1.0,
    ):
        """``current + alpha a @ b``, or ``a @ b`` into a buffer kept across steps (no fresh memory)."""
        if current is not None:
            return current.addmm_(a, b, alpha=alpha)
        buf = self._bufs.get(key)
        shape = (a.shape[0], b.shape[1])
        if buf is None or buf.shape != shape or buf.dtype != a.dtype or buf.device != a.device:
            buf = self._bufs[key] = torch.empty(shape, dtype=a.dtype, device=a.device)
        return torch.mm(a, b, out=buf)

    def _sym(
        self,
        current: torch.Tensor | None,
        key: str,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        alpha: float = 1.0,
    ):
        """:meth:`_mm` for a symmetric ``a @ b`` (``d x d``); the bottom-left block stays zero.

        ``alpha`` scales the product when it is added to ``current``.
        """
        d = a.shape[0]
        if d < SYM_MIN:
            return self._mm(current, key, a, b, alpha=alpha)
        h = d // 2
        if current is None:
            current = self._bufs.get(key)
            if current is None or current.shape != (d, d) or current.dtype != a.dtype:
                current = self._bufs[key] = torch.zeros((d, d), dtype=a.dtype, device=a.device)
            torch.mm(a[:h], b, out=current[:h])
            torch.mm(a[h:], b[:, h:], out=current[h:, h:])
            return current
        current[:h].addmm_(a[:h], b, alpha=alpha)
        current[h:, h:].addmm_(a[h:], b[:, h:], alpha=alpha)
        return current

    def _symmetric(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of a sum of :meth:`_sym` products with its bottom-left block filled."""
        t = t.clone()
        d = t.shape[0]
        if t.dim() == 2 and d >= SYM_MIN:
            h = d // 2
            t[h:, :h] = t[:h, h:].t()
        return t

    def _colsum(self, a: torch.Tensor, b: torch.Tensor, key: str) -> torch.Tensor:
        """``(a * b).sum(0)``, the product in a buffer kept across steps."""
        buf = self._bufs.get(key)
        if buf is None or buf.shape != a.shape or buf.dtype != a.dtype or buf.device != a.device:
            buf = self._bufs[key] = torch.empty(a.shape, dtype=a.dtype, device=a.device)
        return torch.mul(a, b, out=buf).sum(0)

    def add_samples(self, g: torch.Tensor, h: torch.Tensor | None) -> None:
        """Add one backward pass's rows ``g_i`` (and ``h_i`` for the ``gh`` route)."""
        g = g.reshape(-1, g.shape[-1]).to(self.dtype)
        self.plan(g.shape[0], free_g=True)
        h = (
            h.reshape(-1, h.shape[-1]).to(self.dtype)
            if self.route == "gh" and h is not None
            else None
        )
        self.rows += g.shape[0]
        if not self.diag:  # multiplied at the step, straight into the sums (_add_kept)
            self.kept.append((g, h))
            self.kept_rows += g.shape[0]
            if self.kept_rows > self.layer.d_in:  # rows now outweigh two d_in x d_in buffers
                self._materialize()
            return
        gg = torch.linalg.vecdot(g, g, dim=0)
        self.gg = gg if self.gg is None else self.gg.add_(gg)
        if h is not None:
            gh = torch.linalg.vecdot(g, h, dim=0)
            self.gh = gh if self.gh is None else self.gh.add_(gh)

    def _materialize(self) -> None:
        """Multiply the kept rows into the step buffers ``gg`` and ``gh``."""
        for g, h in self.kept:
            self.gg = self._sym(self.gg, "gg", g.t(), g)
            if h is not None:
                self.gh = self._mm(self.gh, "gh", g.t(), h)
        self.kept.clear()
        self.kept_rows = 0

    def _add_kept(self, into: dict, first: float, second: float) -> None:
        """Full mode: the kept rows' (or ``D``'s) products straight into the sums, scaled.

        Saves a ``d_in x d_in`` buffer write and its re-read per product and step.
        """
        for g, h in self.kept:
            self._sym(into["vcs_second"], "gg", g.t(), g, alpha=second)
            if h is not None:
                into["first_half"].addmm_(g.t(), h, alpha=first)
        self.kept.clear()
        self.kept_rows = 0
        if self.dd is not None:
            W = self.layer.weight(self.dtype)
            self._sym(into["vcs_second"], "gg", W.t(), self.dd @ W, alpha=second)
            self.dd = None

    def add_dz(self, dz: torch.Tensor) -> None:
        """Add one backward pass's output gradients (the ``dz`` route: ``D = sum_i dz_i dz_i^T``)."""
        dz = dz.reshape(-1, dz.shape[-1]).to(self.dtype)
        self.dd = self._mm(self.dd, "dd", dz.t(), dz)
        self.rows += dz.shape[0]

    def _finish_second(self) -> None:
        """Turn the ``dz`` route's ``D`` into ``sum_i g_i g_i^T = W^T D W`` (once per step)."""
        if self.dd is None:
            return
        W = self.layer.weight(self.dtype)
        DW = self.dd @ W
        self.gg = (
            torch.linalg.vecdot(DW, W, dim=0) if self.diag else self._sym(None, "gg", W.t(), DW)
        )
        self.dd = None

    def local_buffers(self) -> list[torch.Tensor]:
        """The step's products to be summed over data-parallel ranks, flattened, float64."""
        self._finish_second()
        self._materialize()
        shape = self.sums["first_half"].shape
        zero = torch.zeros(shape, dtype=torch.float64, device=self.device)
        gg = zero if self.gg is None else self.gg.double()
        gh = zero if self.gh is None else self.gh.double()
        rows = torch.tensor([float(self.rows)], dtype=torch.float64, device=zero.device)
        return [gg.reshape(-1), gh.reshape(-1), rows]

    def set_buffers(self, flat: torch.Tensor) -> None:
        """Take back :meth:`local_buffers` after the all-reduce."""
        shape = self.sums["first_half"].shape
        n = self.sums["first_half"].numel()
        self.gg = flat[:n].reshape(shape).to(self.dtype)
        self.gh = flat[n : 2 * n].reshape(shape).to(self.dtype) if self.route == "gh" else None
        self.rows = int(round(float(flat[2 * n])))

    def _add_first(self, into: dict, W: torch.Tensor, G: torch.Tensor, alpha: float) -> None:
        """Add ``alpha A`` (diag: its diagonal) to ``into["first_half"]`` by the ``wg`` route."""
        if not self.diag:
            into["first_half"].addmm_(W.t(), G, alpha=alpha)
        elif self.pending is None:
            into["first_half"].add_(self._colsum(W, G, "wg"), alpha=alpha)
        else:
            self._rows("first_half", G).addcmul_(W, G, value=alpha)

    def _add_sgd(self, into: dict, G: torch.Tensor, alpha: float) -> None:
        """Add ``alpha G^T G`` (diag: its diagonal) to ``into["sgd_second"]``."""
        if not self.diag:
            self._sym(into["sgd_second"], "sgd", G.t(), G, alpha=alpha)
        elif self.pending is None:
            into["sgd_second"].add_(self._colsum(G, G, "sgd"), alpha=alpha)
        else:
            self._rows("sgd_second", G).addcmul_(G, G, value=alpha)

    def _rows(self, q: str, like: torch.Tensor) -> torch.Tensor:
        """The elementwise (``d_out x d_in``) pending buffer of diag quantity ``q``."""
        buf = self.pending_rows.get(q)
        if buf is None:
            buf = self.pending_rows[q] = torch.zeros_like(like)
        return buf

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
        per_sample = 1.0 / (scale * ranks)
        into = self.sums if self.pending is None else self.pending
        from_rows = self.route == "gh" and (
            self.gh is not None or any(h is not None for _, h in self.kept)
        )
        if not self.diag:
            self._add_kept(into, -lr * per_sample, (lr * per_sample) ** 2)
        self._finish_second()
        if self.gh is not None:
            into["first_half"].add_(self.gh, alpha=-lr * per_sample)
        if not from_rows:
            self._add_first(into, self.layer.weight(self.dtype), G, -lr)
        if self.gg is not None:
            into["vcs_second"].add_(self.gg, alpha=(lr * per_sample) ** 2)
        if self.sgd:
            self._add_sgd(into, G, lr**2)
        self.pending_steps += 1
        if self.pending is not None and self.pending_steps >= self.flush_every:
            self.flush()
        self.steps += 1
        self.samples += self.rows
        self.lr_sum += lr
        self.reset()
        return True

    def flush(self) -> None:
        """Move the steps summed in the compute dtype into the float64 sums."""
        if self.pending is not None and self.pending_steps:
            for q, t in self.pending.items():
                self.sums[q].add_(t)
                t.zero_()
            for q, t in self.pending_rows.items():
                self.sums[q].add_(t.sum(0, dtype=torch.float64))
                t.zero_()
        self.pending_steps = 0

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
        self.flush()
        half = self.sums["first_half"]
        first = 2 * half if self.diag else half + half.t()
        second = {q: self._symmetric(t) for q, t in self.sums.items() if q != "first_half"}
        out = {"vcs": first + second["vcs_second"], "vcs_first": first, **second}
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
        if self.pending is not None:
            for t in [*self.pending.values(), *self.pending_rows.values()]:
                t.zero_()
        self.pending_steps = 0
        self.gram0 = self.gram() - tensors["dgram"].to(device=device, dtype=torch.float64)
        self.steps = int(tensors["steps"])
        self.samples = int(tensors["samples"])
        self.lr_sum = float(tensors["lr_sum"])
