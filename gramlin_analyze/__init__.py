"""gramlin-analyze: Gram, virtual covariance and target linearity over saved training runs.

>>> import gramlin_analyze as ga
>>> tree = ga.open("digits.zarr")            # doctest: +SKIP
>>> tree["metrics"]["target_linearity"]       # doctest: +SKIP

Importing the package registers the ``gramlin`` xarray accessor
(``da.gramlin.gram()``, ``ds.gramlin.target_linearity(...)``).
"""

from __future__ import annotations

import os

from gramlin_analyze import reducers  # registers the xarray accessor
from gramlin_analyze._version import __version__
from gramlin_analyze.analysis import analyze
from gramlin_analyze.ingest import ingest
from gramlin_analyze.io.discovery import scan

__all__ = ["__version__", "open", "ingest", "analyze", "scan", "reducers"]


def open(path: str | os.PathLike, *, storage_options: dict | None = None, chunks: dict | None = None):  # noqa: A001
    """Open a store as a lazy, Dask-backed :class:`xarray.DataTree`.

    Nothing is read until computed; ``/steps.status`` says which steps are
    complete (only ``ok`` steps hold trustworthy data).

    Parameters
    ----------
    path
        Store path or fsspec URL.
    storage_options
        fsspec options for remote stores.
    chunks
        Dask chunks (default: the store's own chunks).

    Examples
    --------
    >>> tree = open("digits.zarr")  # doctest: +SKIP
    >>> tl = tree["metrics"]["target_linearity"]  # (step, layer)
    >>> tl.sel(layer="fc4").plot()  # doctest: +SKIP
    """
    import xarray as xr

    kwargs = {"storage_options": storage_options} if storage_options else {}
    return xr.open_datatree(str(path), engine="zarr", chunks={} if chunks is None else chunks, **kwargs)
