"""Seeded mutation fuzzing of every reader: success or a project error, nothing else.

Each reader's fixture is a tiny real checkpoint its framework wrote; every
case mutates it (bytes, truncation, length and size fields, zip entry names,
declared shapes) and runs it through guess, list and read (see
:mod:`gramlin_analyze.testing.fuzz`). ``benchmarks/fuzz_readers.py`` runs the
same campaign at any size.
"""

from __future__ import annotations

import pytest

from gramlin_analyze.testing.fuzz import campaign, run_case, write_fixtures

#: Cases per run: about 15 s on two busy cores; orbax cases (a directory restore) weigh less.
CASES = 600
WEIGHTS = {"orbax": 0.3}
SEED = 20261202


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("fuzz-fixtures"))


def test_fixtures_read_cleanly(fixtures, tmp_path):
    """Unmutated, every fixture reads through the same path the mutants take."""
    assert {f.reader for f in fixtures} >= {"safetensors", "torch", "npz"}
    for f in fixtures:
        assert run_case(f.reader, f.path) == "ok", f.path


@pytest.mark.timeout(300)
def test_mutants_raise_only_project_errors(fixtures, tmp_path):
    report = campaign(fixtures, CASES, tmp_path, seed=SEED, weights=WEIGHTS)
    assert report.cases == CASES
    assert not report.failures, "\n".join(report.failures[:20])
    outcomes = {outcome for (_, outcome) in report.outcomes}
    # Both outcomes occur: the mutations are neither all harmless nor all fatal.
    assert "ok" in outcomes and any(o.startswith("error:") for o in outcomes)
