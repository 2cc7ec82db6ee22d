"""What a notebook user does with a store (copy these cells).

Opens a store written by ``make demo`` (or any ``ingest`` + ``analyze``),
plots target linearity per layer over steps, and compares the weight Gram
matrix with the accumulated virtual covariance shift. Needs matplotlib.

Run: ``python examples/notebook_tour.py demo-output/digits-train.zarr``
(figures go beside the store).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(store: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import gramlin_analyze as ga

    # --- cell 1: open lazily; nothing is read until plotted or computed
    tree = ga.open(store)
    metrics = tree["metrics"].to_dataset()
    ok = (tree["steps"]["status"] == "ok").compute()
    print(tree["steps"].to_dataset()[["status", "lr"]].to_dataframe().head())

    # --- cell 2: TL per layer over steps, with the null baseline
    tl = metrics["target_linearity"].where(ok)
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in tl["layer"].values:
        tl.sel(layer=layer).plot(ax=ax, label=f"input of {layer}")
    ax.axhline(float(metrics["tl_null"].max()), ls="--", c="gray", label="null d/N")
    ax.set_ylabel("target linearity")
    ax.set_title("TL of each layer's input (probe = training set)")
    ax.legend()
    fig.savefig(Path(store).with_suffix(".tl.png"), dpi=120, bbox_inches="tight")

    # --- cell 3: Gram change vs accumulated VCS for the first layer at the last step
    layer = str(metrics["layer"].values[0])
    last = int(metrics["step"].where(ok, drop=True)[-1])
    first = int(metrics["step"].where(ok, drop=True)[0])
    W = tree[f"layers/{layer}"]["weight"]
    gram = W.gramlin.gram()  # the xarray accessor: W^T W with dims (step, in_i, in_j)
    dgram = (gram.sel(step=last) - gram.sel(step=first)).values
    acc = tree[f"metrics/{layer}"]["vcs_accumulated"].sel(step=last).values
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(np.diag(acc), np.diag(dgram), s=8)
    ax.set_xlabel("accumulated VCS (diag, trapezoid estimate)")
    ax.set_ylabel("W^T W - W_0^T W_0 (diag)")
    r = float(metrics["gram_vcs_acc_corr"].sel(step=last, layer=layer))
    ax.set_title(f"{layer}: Pearson {r:.2f}")
    fig.savefig(Path(store).with_suffix(".gram_vcs.png"), dpi=120, bbox_inches="tight")

    # --- cell 4: where are checkpoints dense enough for the first-order picture?
    print(metrics["vcs_interval_corr"].where(ok).to_pandas().round(3))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-output/digits-train.zarr")
