"""The store bytes of this checkout against another's (e.g. the commit before a change).

Builds the same capture store with both (an ingest, analyze, then steps
inserted in the middle and appended, ingest and analyze again) and compares
every file, timestamps, the library version and the checkpoints' file
identities aside; a ``step`` coordinate of ``/metrics/<layer>``, which stores
before 0.3 have and later ones inherit from ``/metrics``, is listed apart.

Run: ``git worktree add /tmp/old <commit> && .venv/bin/python benchmarks/compare_store_bytes.py /tmp/old``
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import sys
from pathlib import Path
import gramlin_analyze as ga
from gramlin_analyze.capture.task import CaptureConfig
sys.path.insert(0, sys.argv[2])
from tests.analysis.test_analyze import LR, FACTORY, _run
base = Path(sys.argv[1])
run, x, y = _run(base, [0, 2, 4, 6, 8])
later = [base / "step_0004.pt", base / "step_0008.pt"]
(run / "step_0004.pt").rename(later[0]); (run / "step_0008.pt").rename(later[1])
cfg = CaptureConfig(probe=str(base / "probe.npz"), model=FACTORY, batch_size=16)
store = base / "s.zarr"
ga.ingest(run, store, capture=cfg, lr=LR)
ga.analyze(store, metrics=["gram", "tl", "vc"])
for p in later:
    p.rename(run / p.name)
ga.ingest(run, store, capture=cfg, lr=LR)
ga.analyze(store, metrics=["gram", "tl", "vc"])
"""


def build(repo, base):
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{repo}"}
    subprocess.run(
        [sys.executable, "-c", SCRIPT, str(base), str(HERE)], cwd=repo, env=env, check=True
    )
    root = base / "s.zarr"
    files = {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    shutil.rmtree(base)
    return files


HERE = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    work = Path(sys.argv[2] if len(sys.argv) > 2 else HERE / "benchmarks" / "_work" / "bytes")
    old = build(str(Path(sys.argv[1]).resolve()), work)
    new = build(str(HERE), work)

    def norm(k, v):
        if k.endswith("zarr.json"):
            d = json.loads(v)
            a = d.get("attributes", {})
            for t in ("created_at", "modified_at", "creation_library_version"):
                a.pop(t, None)
            if "consolidated_metadata" in d:
                d["consolidated_metadata"]["metadata"] = {
                    m: x
                    for m, x in d["consolidated_metadata"]["metadata"].items()
                    if not (m.startswith("metrics/") and m.endswith("/step") and m.count("/") == 2)
                }
            return json.dumps(d, sort_keys=True)
        return v

    only_old = sorted(set(old) - set(new))
    only_new = sorted(set(new) - set(old))
    diff = [
        k
        for k in sorted(set(old) & set(new))
        if not k.startswith("steps/stat_key/") and norm(k, old[k]) != norm(k, new[k])
    ]
    print("files old/new:", len(old), len(new))
    print("only in old:", only_old)
    print("only in new:", only_new)
    print("differing (timestamps, library version and stat keys aside):", diff)
