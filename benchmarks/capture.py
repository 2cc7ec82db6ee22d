"""Capture during ingest vs the bare PyTorch loop a user would write.

Writes 20 ``torch.save`` state dicts of an MLP (784 -> 512 -> 512 -> 10,
ReLU) and a seeded 2,000-sample probe set (random inputs, random labels),
then, side by side in this run (alternating, ``--repeats`` times each; medians):

1. ``gramlin_analyze.ingest(run, store, capture=CaptureConfig(...), lr=0.1)``
   into a new store (weights + ``h``/``g`` of every Linear layer); ``capture_s``
   is the call, ``capture_plus_sync_s`` adds the ``sync`` that makes it durable
   (the bare loop writes nothing, so the headline ratio leaves the sync out);
2. the bare loop: for each checkpoint ``torch.load(weights_only=True)``,
   ``load_state_dict``, the probe set in the same batches with forward hooks
   keeping each Linear input ``h`` and output-gradient hooks computing
   ``g = dL/dz @ W`` (the same math), results discarded, with
   ``loss.backward()`` as a user writes it. Capture's backward asks autograd
   for each layer's bias instead (it needs ``dL/dz``, never ``dL/dW``), which
   spares the ``dz^T h`` products; ``ratio_vs_pruned_bare_loop`` compares
   with the bare loop doing the same passes (``torch.autograd.grad(loss,
   biases)``) and computing ``g = dz @ W`` in its hooks as written above.
   Capture also takes ``g`` of every Linear layer but the first from the
   input gradient that backward computes anyway (see
   ``gramlin_analyze.capture.hooks``); ``ratio_vs_matched_bare_loop``
   compares with a bare loop that does that too: the same arithmetic as
   capture, so that ratio is what storing costs and nothing else.

3. the write floor: the bare loop that also ``np.save``s each layer's ``h``
   and ``g`` per checkpoint (the same bytes capture stores, as plain files).
   ``capture_over_write_floor`` is what the store costs beyond writing the
   bytes at all; ``write_floor_ratio`` is what writing them costs on this
   machine (on the development VM, new page-cache memory is backed lazily by
   the hypervisor, about 2.5 ms per MB, so writing 550 MB alone is about 1x
   the bare loop). ``matched_write_floor_ratio`` is the tighter floor: the
   matched loop writing the same bytes the fastest way this machine has
   (reused buffers, ``O_DIRECT``, behind the next checkpoint's passes);
   ``capture_over_matched_write_floor`` is then what the store adds beyond
   the activations' bytes: the weights, the manifest, the probe set, the
   setup.

Also a weights-only ingest (no capture) of the same run for scale: what
``capture_s`` costs before any probe-set work. Target (issue #3):
at most 1.5x a bare loop doing the same forward and backward passes,
i.e. ``ratio_vs_pruned_bare_loop <= 1.5``. When the ratio to the user's loop is above 1.5, the
ingest is profiled once with cProfile on one thread (the task runner swapped
for a sequential loop, in this process only) and the top functions printed.

Run: ``.venv/bin/python benchmarks/capture.py [--n 20] [--probe 2000] [--repeats 3]``.
The model factory is this file's :func:`build` (imported by the ingest's
workers, so nothing below runs on import).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZES = (784, 512, 512, 10)
LR = 0.1


def build():
    """The benchmark MLP (the capture factory)."""
    from torch import nn

    d0, d1, d2, d3 = SIZES
    return nn.Sequential(
        nn.Linear(d0, d1), nn.ReLU(), nn.Linear(d1, d2), nn.ReLU(), nn.Linear(d2, d3)
    )


def write_run(directory: Path, n: int, seed: int = 0) -> None:
    """n checkpoints of a drifting MLP (a random walk stands in for training)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build()
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(n):
        torch.save(model.state_dict(), directory / f"step_{i * 100:05d}.pt")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)


def write_probe(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SIZES[0]), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], n)
    np.savez(path, inputs=x, labels=y)


def bare_loop(
    run: Path,
    probe: Path,
    batch_size: int,
    save_to: Path | None = None,
    pruned: bool = False,
    matched: bool = False,
    direct: bool = False,
) -> None:
    """What a user writes without a store: same passes, same hooks, nothing kept.

    With ``save_to``, the write floor: the same loop also saves every layer's
    ``h`` and ``g`` of each checkpoint with ``np.save`` (one file each, the
    bytes capture stores), i.e. the cost of writing them and nothing else.
    With ``pruned``, the backward asks autograd for the biases only (as
    capture does) instead of ``loss.backward()``: no ``dL/dW`` products.
    With ``matched`` (implies ``pruned``), ``g`` of a layer whose input needs
    a gradient is that input's gradient through the layer (the gradient of
    an alias of the input only the layer uses), as capture takes it: only
    the first layer's ``g`` is a product of its own.
    With ``direct`` (and ``save_to``), the bytes are written the fastest way
    this machine has: each checkpoint's ``h`` and ``g`` per layer assembled
    in reused page-aligned buffers (two sets, alternating) and written with ``O_DIRECT``
    by a background thread while the next checkpoint runs (the library's
    ``write_raw_chunk``, as capture writes its chunks): the floor of storing
    them at all.
    """
    import torch
    from torch import nn

    data = np.load(probe)
    x_all, y_all = torch.from_numpy(data["inputs"]), torch.from_numpy(data["labels"]).long()
    n = x_all.shape[0]
    model = build()
    model.eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    results: list = []

    pruned = pruned or matched

    def alias_input(module, args):
        x = args[0]
        if not x.requires_grad:  # the first layer: g from dz below
            return None
        alias = x.view_as(x)
        alias.register_hook(results.append)  # g = W^T dL/dz, computed by backward itself
        return (alias, *args[1:])

    def fwd_hook(module, args, output):
        results.append(args[0].detach())  # h
        if matched and args[0].requires_grad:
            return
        w = module.weight

        def grad_hook(dz):
            results.append(dz @ w.detach())  # g = dL/dz @ W

        output.register_hook(grad_hook)

    handles = [m.register_forward_hook(fwd_hook) for m in linears]
    if matched:
        handles += [m.register_forward_pre_hook(alias_input) for m in linears]
    direct = direct and save_to is not None
    if direct:
        import mmap
        from concurrent.futures import ThreadPoolExecutor

        from gramlin_analyze.store import write_raw_chunk

        writer = ThreadPoolExecutor(1)
        widths = [m.in_features for m in linears] * 2
        # page-aligned, as capture's chunk buffers: O_DIRECT writes them with no staging copy
        sets = [
            [np.frombuffer(mmap.mmap(-1, n * d * 4), np.float32).reshape(n, d) for d in widths]
            for _ in range(2)
        ]
        writing: list[list] = [[], []]
    try:
        for i, ckpt in enumerate(sorted(run.glob("*.pt"))):
            model.load_state_dict(torch.load(ckpt, weights_only=True))
            kept: dict[int, list] = {k: [] for k in range(2 * len(linears))}
            if direct:
                for fut in writing[i % 2]:  # this set's last writes are done before it is refilled
                    fut.result()
            for start in range(0, n, batch_size):
                x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
                model.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y, reduction="sum") / n
                if pruned:
                    torch.autograd.grad(loss, [m.bias for m in linears])
                else:
                    loss.backward()
                if save_to is not None:
                    # forward hooks append h per layer, then backward appends g in reverse
                    hs, gs = results[: len(linears)], results[len(linears) :][::-1]
                    for k, t in enumerate(hs + gs):
                        if direct:
                            sets[i % 2][k][start : start + len(x)] = t.numpy()
                        else:
                            kept[k].append(t.numpy())
                results.clear()  # discard h and g
            if direct:
                writing[i % 2] = [
                    writer.submit(write_raw_chunk, save_to / ckpt.stem / str(k), buf)
                    for k, buf in enumerate(sets[i % 2])
                ]
            elif save_to is not None:
                save_to.mkdir(parents=True, exist_ok=True)
                for k, parts in kept.items():
                    np.save(save_to / f"{ckpt.stem}_{k}.npy", np.concatenate(parts))
        if direct:
            for fut in writing[0] + writing[1]:
                fut.result()
    finally:
        for h in handles:
            h.remove()
        if direct:
            writer.shutdown(wait=True)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(fn) -> tuple[float, float]:
    """(seconds of the call, seconds of the ``sync`` after it), caches flushed before."""
    os.sync()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    os.sync()
    return t1 - t0, time.perf_counter() - t1


def profile_ingest(run: Path, store: Path, cfg, top: int = 20) -> list[str]:
    """cProfile of one capture ingest, tasks run sequentially in this thread."""
    import cProfile
    import io
    import pstats
    import sys

    import gramlin_analyze.ingest  # noqa: F401  (the package attribute is the function)

    ingest_mod = sys.modules["gramlin_analyze.ingest"]

    def sequential(workers, scheduler, threads):
        def run_tasks(tasks, on_done):
            for t in tasks:
                on_done(t[0](*t[1:]))

        return run_tasks

    shutil.rmtree(store, ignore_errors=True)
    saved = ingest_mod.make_runner
    ingest_mod.make_runner = sequential
    prof = cProfile.Profile()
    try:
        prof.enable()
        ingest_mod.ingest(run, store, capture=cfg, lr=LR)
        prof.disable()
    finally:
        ingest_mod.make_runner = saved
    out = []
    # Most time spent in one place; then the package's call tree (the lock waits
    # above are zarr's I/O thread doing the store's reads and writes).
    for key, restrict in (
        ("tottime", (top,)),
        ("cumulative", (r"gramlin_analyze|run_backward", top)),
    ):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(*restrict)
        lines = [ln.strip() for ln in buf.getvalue().splitlines() if ln.strip()]
        start = next(i for i, ln in enumerate(lines) if ln.startswith("ncalls"))
        out.append(f"-- sorted by {key} --")
        out.extend(lines[start:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=20, help="checkpoints")
    p.add_argument("--probe", type=int, default=2000, help="probe samples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=str(HERE / "_work" / "capture"))
    a = p.parse_args()
    import torch

    from gramlin_analyze.capture.task import CaptureConfig
    from gramlin_analyze.ingest import ingest

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    run, probe, store = work / "run", work / "probe.npz", work / "store.zarr"
    write_run(run, a.n)
    write_probe(probe, a.probe)
    os.sync()
    cfg = CaptureConfig(
        probe=str(probe), model=f"{Path(__file__).resolve()}:build", batch_size=a.batch_size
    )

    def fresh(**kw):
        shutil.rmtree(store, ignore_errors=True)
        return timed(lambda: ingest(run, store, **kw))

    bare_loop(run, probe, a.batch_size)  # warm-up: imports, allocator, page cache
    report = ingest(run, store, capture=cfg, lr=LR)
    if report.failed:
        raise RuntimeError(f"capture ingest failed: {report.failed}")
    t_cap, t_bare, t_w, t_floor, t_pruned, t_matched, t_mfloor = [], [], [], [], [], [], []
    saved = work / "saved"
    floor_bytes = 0
    for _ in range(a.repeats):
        t_bare.append(timed(lambda: bare_loop(run, probe, a.batch_size)))
        t_pruned.append(timed(lambda: bare_loop(run, probe, a.batch_size, pruned=True)))
        t_matched.append(timed(lambda: bare_loop(run, probe, a.batch_size, matched=True)))
        shutil.rmtree(saved, ignore_errors=True)
        t_floor.append(timed(lambda: bare_loop(run, probe, a.batch_size, save_to=saved)))
        floor_bytes = du(saved)
        shutil.rmtree(saved)
        t_mfloor.append(
            timed(
                lambda: bare_loop(
                    run, probe, a.batch_size, save_to=saved, matched=True, direct=True
                )
            )
        )
        shutil.rmtree(saved)
        t_w.append(fresh())
        t_cap.append(fresh(capture=cfg, lr=LR))
    store_bytes = du(store)  # the last capture's store
    cap, bare, w_only, floor, pruned, matched, mfloor = (
        statistics.median(t[0] for t in ts)
        for ts in (t_cap, t_bare, t_w, t_floor, t_pruned, t_matched, t_mfloor)
    )
    cap_sync = statistics.median(c + s for c, s in t_cap)
    per_ckpt = 2 * a.probe * sum(SIZES[:-1]) * 4
    res = {
        "checkpoints": a.n,
        "probe_samples": a.probe,
        "batch_size": a.batch_size,
        "model": "x".join(map(str, SIZES)),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "repeats": a.repeats,
        "capture_s": round(cap, 3),
        "bare_loop_s": round(bare, 3),
        "ratio": round(cap / bare, 3),
        "target_ratio": 1.5,
        "bare_loop_pruned_backward_s": round(pruned, 3),
        "ratio_vs_pruned_bare_loop": round(cap / pruned, 3),
        "bare_loop_matched_s": round(matched, 3),
        "ratio_vs_matched_bare_loop": round(cap / matched, 3),
        "matched_loop_plus_direct_write_s": round(mfloor, 3),
        "matched_write_floor_ratio": round(mfloor / matched, 3),
        "capture_over_matched_write_floor": round(cap / mfloor, 3),
        "capture_plus_sync_s": round(cap_sync, 3),
        "ratio_with_sync": round(cap_sync / bare, 3),
        "weights_only_ingest_s": round(w_only, 3),
        "bare_loop_plus_np_save_s": round(floor, 3),
        "np_save_MB": round(floor_bytes / 2**20, 1),
        "write_floor_ratio": round(floor / bare, 3),
        "capture_over_write_floor": round(cap / floor, 3),
        "bare_loop_plus_np_save_all_s": [round(t[0], 3) for t in t_floor],
        "capture_all_s": [round(t[0], 3) for t in t_cap],
        "bare_loop_all_s": [round(t[0], 3) for t in t_bare],
        "bare_loop_pruned_all_s": [round(t[0], 3) for t in t_pruned],
        "bare_loop_matched_all_s": [round(t[0], 3) for t in t_matched],
        "matched_loop_plus_direct_write_all_s": [round(t[0], 3) for t in t_mfloor],
        "store_MB": round(store_bytes / 2**20, 1),
        "h_g_MB_per_checkpoint": round(per_ckpt / 2**20, 1),
        "capture_write_MB_per_s": round(a.n * per_ckpt / 2**20 / cap, 1),
    }
    if cap / bare > 1.5:
        res["profile_sequential_top_tottime"] = profile_ingest(run, store, cfg)
    shutil.rmtree(work, ignore_errors=True)
    if work.parent.name == "_work" and work.parent.exists() and not any(work.parent.iterdir()):
        work.parent.rmdir()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
