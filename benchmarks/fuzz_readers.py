"""A larger mutation-fuzzing campaign over every checkpoint reader.

``make test`` runs a few hundred cases (tests/readers/test_fuzz.py); this
runs as many as asked and prints the outcomes by reader, so a change to a
reader can be checked against thousands of damaged files::

    python benchmarks/fuzz_readers.py --cases 5000 --seed 1

Exit status 1 when any case crashed with a non-project exception, hung, or
allocated without checking declared sizes (the failures are listed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from gramlin_analyze.testing.fuzz import campaign, write_fixtures


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="number of mutants (2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per case (10)")
    parser.add_argument(
        "--families",
        nargs="*",
        default=None,
        help="fixture families: torch numpy onnx flax keras orbax (default: all installed)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    with tempfile.TemporaryDirectory(prefix="gramlin-fuzz-") as tmp:
        fixtures = write_fixtures(Path(tmp) / "fixtures", args.families)
        print(f"{len(fixtures)} fixtures: " + ", ".join(f.path.name for f in fixtures))
        started = time.perf_counter()
        report = campaign(
            fixtures, args.cases, Path(tmp) / "cases", seed=args.seed, timeout=args.timeout
        )
        elapsed = time.perf_counter() - started
    by_outcome: Counter = Counter()
    print(
        f"{report.cases} cases in {elapsed:.1f} s ({elapsed / max(report.cases, 1) * 1e3:.0f} ms/case)"
    )
    for (reader, outcome), n in sorted(report.outcomes.items()):
        by_outcome[outcome] += n
        print(f"  {reader:12s} {outcome:36s} {n:6d}")
    print("by outcome: " + ", ".join(f"{k}={v}" for k, v in by_outcome.most_common()))
    for line in report.guarded[:40]:
        print("GUARDED", line[:400])
    for line in report.failures:
        print("FAILURE", line)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
