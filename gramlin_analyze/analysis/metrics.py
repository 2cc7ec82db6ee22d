"""What ``analyze`` can compute: metric families, their outputs and what they need.

Each family is computed per (step, layer) in one task (phase 1: the
expensive pass over weights and activations), then, for interval and
accumulated quantities, per layer along steps from the stored per-step
matrices (phase 2: cheap, d x d work per step). Definitions: docs/metrics.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ASSUMES_SGD", "Family", "FAMILIES", "METRIC_DOCS", "resolve_families"]


@dataclass(frozen=True)
class Family:
    name: str
    needs: tuple[str, ...]
    scalars: tuple[str, ...]
    matrices: tuple[str, ...] = ()
    phase2_scalars: tuple[str, ...] = ()
    phase2_matrices: tuple[str, ...] = ()
    options: tuple[str, ...] = field(default=())


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "gram",
            needs=("weight",),
            scalars=("fro_norm",),
            matrices=("gram",),
            phase2_scalars=("gram_change",),
        ),
        Family(
            "spectrum",
            needs=("weight",),
            scalars=("effective_rank", "stable_rank", "spectral_norm"),
            matrices=("spectrum",),
        ),
        Family(
            "vc",
            needs=("weight", "activations", "lr"),
            scalars=("gram_vc_corr", "gram_vc_corr_full", "gram_vc_cos"),
            matrices=("vc", "vcs", "gg"),
            phase2_scalars=(
                "gram_vcs_acc_corr",
                "gram_vcs_acc_corr_full",
                "gram_vcs_acc_cos",
                "dgram_vcs_corr",
                "vcs_interval_corr",
                "vcs_interval_ratio",
                "fle_residual",
                "fle_second_order",
            ),
            phase2_matrices=("vcs_accumulated",),
            options=("train_batch_size",),
        ),
        Family(
            "tl",
            needs=("activations", "targets"),
            scalars=("target_linearity", "tl_null", "tl_surrogate", "kta"),
            options=("tl_lambda", "center_features", "intercept", "pca"),
        ),
        Family(
            "nfa",
            needs=("weight", "agop"),
            scalars=("nfa_corr", "nfa_corr_diag", "nfa_sqrt_corr", "nfa_sqrt_corr_diag"),
        ),
        Family(
            "nc",
            needs=("activations", "labels"),
            scalars=("nc1", "nc2_equinorm", "nc2_equiangularity", "nc3", "nc4"),
        ),
        Family("cka", needs=("activations",), scalars=("cka_to_final",)),
    )
}

#: Quantities defined by the virtual plain-SGD update ``W - gamma G`` with the recorded lr
#: (MATH.md): their meaning assumes plain SGD steps. Each carries ``assumes: "sgd"`` and an
#: ``optimizer_check`` attribute, and ``analyze``/``info`` warn when the run used another
#: optimizer (docs/metrics.md, "Other optimizers"). ``gg`` (a gradient statistic) does not.
ASSUMES_SGD: tuple[str, ...] = (
    *FAMILIES["vc"].scalars,
    *FAMILIES["vc"].phase2_scalars,
    "vc",
    "vcs",
    "vcs_accumulated",
)

#: One line per metric (README and ``long_name`` attrs).
METRIC_DOCS: dict[str, str] = {
    "effective_rank": "exp of the spectral entropy of W^T W",
    "stable_rank": "||W||_F^2 / ||W||_2^2",
    "fro_norm": "Frobenius norm of W",
    "spectral_norm": "largest singular value of W",
    "gram_change": "||W_b^T W_b - W_a^T W_a||_F / ||W_a^T W_a||_F from the previous checkpoint",
    "gram": "weight Gram matrix W^T W",
    "spectrum": "eigenvalues of W^T W, descending (via W W^T when d_in > d_out)",
    "gram_vc_corr": "Pearson correlation of diag(W^T W) and diag(VC) (paper's diag mode)",
    "gram_vc_corr_full": "Pearson correlation of all entries of W^T W and VC",
    "gram_vc_cos": "cosine similarity <W^T W, VC>_F / (|W^T W|_F |VC|_F)",
    "vc": "virtual covariance sum_i (h_i - gamma g_i)(h_i - gamma g_i)^T",
    "vcs": "virtual covariance shift VC - sum_i h_i h_i^T",
    "gg": "sum_i g_i g_i^T (for the second-order term)",
    "vcs_accumulated": "trapezoid estimate of the VCS summed over every optimizer step since the first checkpoint",
    "gram_vcs_acc_corr": "diag Pearson of W^T W - W_0^T W_0 and the accumulated VCS (estimate)",
    "gram_vcs_acc_corr_full": "full Pearson of W^T W - W_0^T W_0 and the accumulated VCS",
    "gram_vcs_acc_cos": "cosine of W^T W - W_0^T W_0 and the accumulated VCS",
    "dgram_vcs_corr": "diag Pearson of W_b^T W_b - W_a^T W_a and (b - a)(VCS_a + VCS_b)/2",
    "vcs_interval_corr": "full Pearson of W_b^T W_b - W_a^T W_a and (b - a)(VCS_a + VCS_b)/2 (interval consistency)",
    "vcs_interval_ratio": "||(b - a)(VCS_a + VCS_b)/2||_F / ||W_b^T W_b - W_a^T W_a||_F",
    "fle_residual": "||dGram - (b - a) VCS_a||_F / ||dGram||_F between consecutive checkpoints",
    "fle_second_order": "||gamma^2 (G^T G - sum g g^T)||_F / ||dGram||_F with G = (W_a - W_b)/(gamma (b - a))",
    "target_linearity": "TL = 1 - ||Y_c - H B||^2 / ||Y_c||^2 of the layer input H",
    "tl_null": "null baseline min(1, d/N)",
    "tl_surrogate": "||Z^T Y_c||_F^2 / C with Z = H W^T",
    "kta": "kernel-target alignment ||Z^T Y_c||_F^2 / (||Z^T Z||_F ||Y_c^T Y_c||_F)",
    "nfa_corr": "full Pearson of W^T W and AGOP (Neural Feature Ansatz)",
    "nfa_corr_diag": "diag Pearson of W^T W and AGOP",
    "nfa_sqrt_corr": "full Pearson of W^T W and AGOP^(1/2)",
    "nfa_sqrt_corr_diag": "diag Pearson of W^T W and AGOP^(1/2)",
    "nc1": "tr(Sigma_W Sigma_B^+)/C of the layer input",
    "nc2_equinorm": "std/mean of ||mu_c - mu_G||",
    "nc2_equiangularity": "mean |cos(mu_c - mu_G, mu_c' - mu_G) + 1/(C-1)|",
    "nc3": "|| W^T/|W|_F - M/|M|_F ||_F^2 (readout layers: d_out = C)",
    "nc4": "fraction of samples whose readout prediction differs from the nearest class mean",
    "cka_to_final": "linear CKA between this step's layer input and the last ok step's",
}


def resolve_families(metrics: list[str] | None) -> list[str] | None:
    """Family names for requested metric or family names (None: every available family)."""
    if not metrics:
        return None
    out: list[str] = []
    for m in metrics:
        if m in FAMILIES:
            fam = m
        else:
            fam = next(
                (
                    f.name
                    for f in FAMILIES.values()
                    if m in f.scalars + f.matrices + f.phase2_scalars + f.phase2_matrices
                ),
                None,
            )
            if fam is None:
                from gramlin_analyze.errors import UsageError

                raise UsageError(
                    f"unknown metric {m!r}; families: {', '.join(FAMILIES)}; metrics: {', '.join(METRIC_DOCS)}"
                )
        if fam not in out:
            out.append(fam)
    return out
