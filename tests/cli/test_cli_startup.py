"""Start-up: small commands import only what they need (issue 11, point 11).

Each command runs as a real process (``python -X importtime -m gramlin_analyze``)
and the test reads which modules it imported: nothing here measures time.
``benchmarks/startup.py`` measures it.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import gramlin_analyze as ga
from tests.trajectory import write_trajectory

pytestmark = pytest.mark.slow

#: Never needed by --version / --help (nor by the package import).
HEAVY = {
    "xarray",
    "dask",
    "distributed",
    "torch",
    "pandas",
    "scipy",
    "zarr",
    "numpy",
    "rich",
    "jsonschema",
    "safetensors",
    "matplotlib",
    "threadpoolctl",
    "fsspec",
}
#: Not needed by an ingest or analyze with nothing to do (zarr and numpy read the manifest).
NOT_FOR_A_NO_OP = {
    "xarray",
    "dask",
    "distributed",
    "torch",
    "pandas",
    "scipy",
    "rich",
    "jsonschema",
    "matplotlib",
}


def imported_by(*args: str) -> set[str]:
    """Top-level names of every module ``gramlin-analyze ARGS`` imported (it must exit 0)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gramlin_analyze", *args],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", out.stderr, flags=re.M)
    assert names, "python -X importtime wrote no module list"
    return {n.split(".")[0] for n in names}


def imported_by_code(code: str) -> set[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code + "\nimport sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["--help"],
        ["ingest", "--help"],
        ["analyze", "--help"],
        ["report", "--help"],
        ["summary", "--help"],
    ],
)
def test_version_and_help_import_nothing_heavy(args):
    assert not imported_by(*args) & HEAVY


@pytest.mark.parametrize(
    ("args", "commands"),
    [(["--version"], set()), (["--help"], set()), (["ingest", "--help"], {"ingest"})],
)
def test_a_command_module_is_imported_only_when_named(args, commands):
    """``-X importtime`` does not list the command modules (``importlib`` imports them)."""
    code = f"""
import sys
from gramlin_analyze.cli import main
try:
    main({args!r})
except SystemExit:
    pass
print(" ".join(m for m in sys.modules if m.startswith("gramlin_analyze.cli.")), file=sys.stderr)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    shared = {"app", "options", "output", "registry"}
    loaded = {m.removeprefix("gramlin_analyze.cli.") for m in out.stderr.split()}
    assert loaded == shared | commands


def test_importing_the_package_imports_nothing_heavy_and_keeps_its_names():
    assert (
        not imported_by_code("import gramlin_analyze as ga\nassert set(ga.__all__) <= set(dir(ga))")
        & HEAVY
    )


def test_public_names_load_on_use(tmp_path):
    code = f"""
import sys, numpy as np
import gramlin_analyze as ga
import gramlin_analyze.ingest  # the submodule's import must not replace the function
assert callable(ga.ingest) and ga.ingest.__module__ == "gramlin_analyze.ingest", ga.ingest
assert "xarray" not in sys.modules
from tests.trajectory import write_trajectory
write_trajectory(r"{tmp_path / "run"}", [0, 5])
assert ga.ingest(r"{tmp_path / "run"}", r"{tmp_path / "s.zarr"}").ingested == [0, 5]
assert ga.analyze(r"{tmp_path / "s.zarr"}", metrics=["gram"]).computed == 4
assert "xarray" not in sys.modules, "the numpy kernels of analyze import xarray"
assert [s.step for s in ga.scan(r"{tmp_path / "run"}")] == [0, 5]
tree = ga.open(r"{tmp_path / "s.zarr"}")
W = tree["layers/fc1"]["weight"]
np.testing.assert_allclose(W.gramlin.gram().values, np.einsum("soi,soj->sij", W.values, W.values), rtol=1e-6)
assert ga.reducers.gram_np is not None and "reducers" in dir(ga)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=str(_repo())
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("xarray_first", [True, False])
def test_the_accessor_is_registered_whichever_is_imported_first(xarray_first):
    first, second = (
        ("import xarray as xr", "import gramlin_analyze")
        if xarray_first
        else ("import gramlin_analyze", "import xarray as xr")
    )
    code = f"""
{first}
{second}
import numpy as np
import xarray as xr
W = xr.DataArray(np.diag([3.0, 4.0]), dims=("out", "in"))
assert W.gramlin.spectrum().values.tolist() == [16.0, 9.0]
assert xr.Dataset({{"weight": W}}).gramlin is not None
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]


def test_reducers_kernels_import_neither_xarray_nor_dask():
    mods = imported_by_code(
        "from gramlin_analyze.reducers import gram_np, vcs_np, target_linearity_from_stats_np"
    )
    assert not mods & {"xarray", "dask", "pandas"}


def test_no_op_ingest_and_analyze_import_neither_xarray_nor_dask_nor_torch(tmp_path):
    run, store = tmp_path / "run", tmp_path / "s.zarr"
    write_trajectory(run, [0, 10, 20, 30])  # safetensors and torch.save checkpoints
    assert ga.ingest(run, store).ingested == [0, 10, 20, 30]
    ga.analyze(store, metrics=["gram"])

    assert not imported_by("ingest", str(run), "--store", str(store)) & NOT_FOR_A_NO_OP
    assert not imported_by("ingest", str(run), "--store", str(store), "-q") & NOT_FOR_A_NO_OP
    assert not imported_by("analyze", str(store), "--metrics", "gram") & NOT_FOR_A_NO_OP
    assert not imported_by("analyze", str(store), "--metrics", "gram", "-q") & NOT_FOR_A_NO_OP

    # Work to do: analyze runs its NumPy kernels, still without xarray or Dask.
    write_trajectory(run, [40])
    assert ga.ingest(run, store).ingested == [40]
    assert not imported_by("analyze", str(store), "--metrics", "gram", "-q") & {
        "xarray",
        "dask",
        "pandas",
        "torch",
    }
    assert ga.analyze(store, metrics=["gram"]).computed == 0  # that run did it


def _repo():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
