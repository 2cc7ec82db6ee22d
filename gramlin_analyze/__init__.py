"""gramlin-analyze: Gram, virtual covariance and target linearity over saved training runs.

>>> import gramlin_analyze as ga
>>> tree = ga.open("digits.zarr")            # doctest: +SKIP
>>> tree["metrics"]["target_linearity"]       # doctest: +SKIP
>>> runs = ga.open_runs("sweep/*.zarr")       # doctest: +SKIP  (a ``run`` dimension)

Importing the package makes the ``gramlin`` xarray accessor available
(``da.gramlin.gram()``, ``ds.gramlin.target_linearity(...)``): at once when
xarray is already imported, else as soon as xarray is.

The package imports nothing heavy itself: its public names are loaded on
first use (PEP 562), so the command line starts without xarray, Dask or
torch, and each command imports only what it needs.
"""

from __future__ import annotations

import os
import sys
import types

from gramlin_analyze._lazy import lazy_attributes
from gramlin_analyze._version import __version__

__all__ = ["__version__", "open", "open_runs", "ingest", "watch", "analyze", "scan", "reducers"]

_LAZY = {
    "ingest": "gramlin_analyze.ingest:ingest",
    "watch": "gramlin_analyze.ingest:watch",
    "analyze": "gramlin_analyze.analysis:analyze",
    "scan": "gramlin_analyze.io.discovery:scan",
    "open_runs": "gramlin_analyze.runs:open_runs",
    "reducers": "gramlin_analyze.reducers:",
}
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, __all__, globals())


class _Package(types.ModuleType):
    """This package's module type: ``gramlin_analyze.ingest`` stays the function.

    Importing the submodule ``gramlin_analyze.ingest`` makes the import system
    bind the module as the package's ``ingest`` attribute; the public name is
    the function of that module, as it was when the package imported it eagerly.
    """

    def __setattr__(self, name: str, value) -> None:
        if name == "ingest" and isinstance(value, types.ModuleType) and hasattr(value, "ingest"):
            value = value.ingest
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def open(
    path: str | os.PathLike, *, storage_options: dict | None = None, chunks: dict | None = None
):  # noqa: A001
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

    import gramlin_analyze.reducers.accessor  # noqa: F401  (the accessor, whatever imported xarray)

    kwargs = {"storage_options": storage_options} if storage_options else {}
    return xr.open_datatree(
        str(path), engine="zarr", chunks={} if chunks is None else chunks, **kwargs
    )


# -- the accessor: registered with xarray, without importing xarray here --------------


def _register_accessor() -> None:
    try:
        import gramlin_analyze.reducers.accessor  # noqa: F401  (registers .gramlin)
    except Exception:  # noqa: BLE001 - never break the user's import of xarray; reducers says why on use
        pass


class _AccessorOnXarrayImport:
    """A one-shot import hook: once xarray has been imported, register the accessor.

    It wraps only the ``exec_module`` of xarray's own loader (the loader and the
    spec stay xarray's), and removes itself at xarray's first import.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "xarray":
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            return None
        import importlib.util

        try:
            spec = importlib.util.find_spec("xarray")
        except (ImportError, ValueError):
            return None
        loader = getattr(spec, "loader", None) if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module) -> None:
            try:
                exec_module(module)
            finally:
                try:
                    del loader.exec_module  # back to the loader's own method
                except AttributeError:
                    pass
            _register_accessor()

        loader.exec_module = exec_then_register
        return spec


if "xarray" in sys.modules:
    _register_accessor()
elif not any(isinstance(f, _AccessorOnXarrayImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AccessorOnXarrayImport())
