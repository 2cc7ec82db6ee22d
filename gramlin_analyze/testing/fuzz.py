"""A seeded mutation fuzzer for checkpoint readers ("readers never crash the run").

Each fixture is a tiny real checkpoint written by its framework's own saving
code (:func:`write_fixtures`). A case mutates one of its files (byte flips,
truncations, length and size fields set to extremes, odd zip entry names,
inflated declared shapes) and passes the mutant through the public reader
API: ``guess_reader``, ``list_tensors``, ``read_tensor`` and a handle. The
only allowed outcomes are success and a
:class:`~gramlin_analyze.errors.GramlinError`; any other exception, a case
that outlives its time bound, or a ``MemoryError`` behind an error (an
unchecked allocation) is a failure. Used by ``tests/readers/test_fuzz.py``
and ``benchmarks/fuzz_readers.py``.
"""

from __future__ import annotations

import faulthandler
import os
import random
import re
import resource
import shutil
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gramlin_analyze.errors import GramlinError, MissingTensorError
from gramlin_analyze.io.registry import get_reader, guess_reader

__all__ = [
    "Fixture",
    "Report",
    "write_fixtures",
    "mutate",
    "run_case",
    "campaign",
    "is_failure",
    "MUTATORS",
]

_SHAPES = {"enc.weight": (6, 4), "enc.bias": (6,), "head.weight": (3, 6)}
#: A case allocating more than this (peak RSS growth) checked nothing before allocating.
_MEMORY_BOUND = 1 << 30


@dataclass(frozen=True)
class Fixture:
    """A checkpoint written by its framework: the path a reader opens, and the files
    a mutation may touch (relative to ``path`` for directory formats)."""

    reader: str
    path: Path
    targets: tuple[Path, ...]


@dataclass
class Report:
    """Outcome counts of a campaign, and the cases that failed (for the message)."""

    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    #: cases a reader did not foresee, turned into a clear error by the reader guard
    guarded: list[str] = field(default_factory=list)
    cases: int = 0


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in _SHAPES.items()}


def _torch_files(out: Path, arrays: dict[str, np.ndarray]) -> list[Fixture]:
    import torch
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    save_file(tensors, out / "model.safetensors")
    torch.save(tensors, out / "zip.pt")
    torch.save({"state_dict": tensors, "global_step": 3}, out / "legacy.pt", **_legacy())
    return [
        Fixture("safetensors", out / "model.safetensors", (out / "model.safetensors",)),
        Fixture("torch", out / "zip.pt", (out / "zip.pt",)),
        Fixture("torch", out / "legacy.pt", (out / "legacy.pt",)),
    ]


def _legacy() -> dict[str, Any]:
    return {"_use_new_zipfile_serialization": False}


def _numpy_files(out: Path, arrays: dict[str, np.ndarray]) -> list[Fixture]:
    np.savez(out / "plain.npz", **arrays)
    np.savez_compressed(out / "packed.npz", **arrays)
    return [Fixture("npz", out / n, (out / n,)) for n in ("plain.npz", "packed.npz")]


def _onnx_file(out: Path, arrays: dict[str, np.ndarray]) -> list[Fixture]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(arrays["enc.weight"].T.copy(), "enc.weight")]
    inits.append(numpy_helper.from_array(arrays["enc.bias"], "enc.bias"))
    nodes = [helper.make_node("Gemm", ["x", "enc.weight", "enc.bias"], ["y"])]
    io_x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    io_y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])
    model = helper.make_model(helper.make_graph(nodes, "g", [io_x], [io_y], inits))
    onnx.save(model, out / "model.onnx")
    return [Fixture("onnx", out / "model.onnx", (out / "model.onnx",))]


def _flax_file(out: Path, arrays: dict[str, np.ndarray]) -> list[Fixture]:
    from flax.serialization import to_bytes

    tree = {"params": {"Dense_0": {"kernel": arrays["enc.weight"].T, "bias": arrays["enc.bias"]}}}
    (out / "params.msgpack").write_bytes(to_bytes(tree))
    return [Fixture("flax", out / "params.msgpack", (out / "params.msgpack",))]


def _keras_file(out: Path, arrays: dict[str, np.ndarray]) -> list[Fixture]:
    os.environ.setdefault("KERAS_BACKEND", "torch")  # torch is always installed
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6)])
    model.set_weights([arrays["enc.weight"].T, arrays["enc.bias"]])
    model.save_weights(out / "model.weights.h5")
    return [Fixture("keras", out / "model.weights.h5", (out / "model.weights.h5",))]


def _orbax_dir(out: Path, arrays: dict[str, np.ndarray]) -> list[Fixture]:
    import orbax.checkpoint as ocp

    step = out / "orbax" / "7"
    tree = {"params": {"Dense_0": {"kernel": arrays["enc.weight"].T, "bias": arrays["enc.bias"]}}}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(step.resolve(), tree)
    targets = tuple(sorted(f.relative_to(step) for f in step.rglob("*") if f.is_file()))
    return [Fixture("orbax", step, targets)]


WRITERS: dict[str, Callable[[Path, dict[str, np.ndarray]], list[Fixture]]] = {
    "torch": _torch_files,
    "numpy": _numpy_files,
    "onnx": _onnx_file,
    "flax": _flax_file,
    "keras": _keras_file,
    "orbax": _orbax_dir,
}


def write_fixtures(out: Path, families: list[str] | None = None) -> list[Fixture]:
    """Tiny real checkpoints of each family whose framework is installed."""
    out.mkdir(parents=True, exist_ok=True)
    fixtures: list[Fixture] = []
    for family, write in WRITERS.items():
        if families is not None and family not in families:
            continue
        try:
            fixtures += write(out, _arrays(len(fixtures)))
        except ImportError:
            continue
    return fixtures


# -- mutations ---------------------------------------------------------------------

_EXTREMES = (0, 1, 0x7F, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 0x7FFF_FFFF_FFFF_FFFF, 2**64 - 1)


def _flip(data: bytearray, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return "flip"


def _truncate(data: bytearray, rng: random.Random) -> str:
    cut = rng.choice([rng.randrange(len(data)), rng.randrange(min(len(data), 256)), len(data) - 1])
    del data[cut:]
    return "truncate"


def _length_field(data: bytearray, rng: random.Random) -> str:
    """Overwrite a 1/2/4/8-byte field, mostly in the header, with an extreme value."""
    width = rng.choice((1, 2, 4, 8))
    head = min(len(data), 512) if rng.random() < 0.7 else len(data)
    at = rng.randrange(max(head - width, 1))
    value = rng.choice(_EXTREMES) & ((1 << (8 * width)) - 1)
    data[at : at + width] = value.to_bytes(width, rng.choice(("little", "big")))
    return "length-field"


def _zip_fields(data: bytearray, rng: random.Random) -> str:
    """Corrupt the sizes, name lengths or names of a zip's local and central headers."""
    heads = [(m.start(), 18) for m in re.finditer(rb"PK\x03\x04", data)]
    heads += [(m.start(), 20) for m in re.finditer(rb"PK\x01\x02", data)]
    if not heads:
        return _length_field(data, rng)
    at, sizes = rng.choice(heads)
    choice = rng.randrange(3)
    if choice == 0:  # compressed or uncompressed size
        field_at = at + sizes + 4 * rng.randrange(2)
        data[field_at : field_at + 4] = struct.pack("<I", rng.choice(_EXTREMES) & 0xFFFFFFFF)
        return "zip-size"
    if choice == 1:  # file name length
        field_at = at + (26 if sizes == 18 else 28)
        data[field_at : field_at + 2] = struct.pack("<H", rng.choice((0, 1, 0xFFFF)))
        return "zip-name-length"
    return _zip_name(data, at, sizes, rng)


def _zip_name(data: bytearray, at: int, sizes: int, rng: random.Random) -> str:
    """Replace bytes of an entry name with non-UTF-8 ones and mark the name UTF-8."""
    name_len_at, name_at = (at + 26, at + 30) if sizes == 18 else (at + 28, at + 46)
    n = struct.unpack("<H", data[name_len_at : name_len_at + 2])[0]
    flags_at = at + (6 if sizes == 18 else 8)
    data[flags_at + 1] |= 0x08  # general purpose bit 11: the name is UTF-8
    for _ in range(rng.randint(1, 3)):
        if n:
            data[name_at + rng.randrange(n)] = rng.choice((0xFF, 0xC3, 0x80, 0xFE, 0x00, 0x2F))
    return "zip-name"


_DIGITS = re.compile(rb"\d+")


def _inflate_shape(data: bytearray, rng: random.Random) -> str:
    """Turn a number in a text header (npy dict, safetensors JSON) into a huge one."""
    head = bytes(data[: min(len(data), 4096)])
    runs = list(_DIGITS.finditer(head))
    if not runs:
        return _length_field(data, rng)
    run = rng.choice(runs)
    big = rng.choice((b"9" * len(run.group()), b"4000000000", b"99999999999999", b"0", b"-1"))
    data[run.start() : run.end()] = big
    return "declared-size"


def _splice(data: bytearray, rng: random.Random) -> str:
    a, b = sorted(rng.randrange(len(data)) for _ in range(2))
    if rng.random() < 0.5:
        del data[a:b]
    else:
        data[a:a] = data[a:b]
    return "splice"


MUTATORS = (_flip, _truncate, _length_field, _zip_fields, _inflate_shape, _splice)


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutant of ``data`` and the name of what was done to it."""
    if not data:
        return b"\x00", "grow"
    out = bytearray(data)
    kind = rng.choice(MUTATORS)(out, rng)
    return bytes(out), kind


# -- running cases -----------------------------------------------------------------


class CaseTimeout(BaseException):
    """A case outlived its bound (a BaseException, so no reader guard converts it)."""


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout


def _exercise(reader_name: str, path: Path, reads: int) -> str:
    """Everything discovery and ingest ask of a reader, through the public API."""
    reader = get_reader(reader_name)
    reader.guess_can_read(path)
    try:
        guess_reader(path)
    except GramlinError:
        pass  # a mutant that no reader claims is an outcome, the rest still runs
    names = list(reader.list_tensors(path))
    if names:
        reader.read_tensor(path, names[0])
    with reader.open(path) as handle:
        listed = handle.list_tensors()
        for name in list(listed)[:reads]:
            try:
                handle.read_tensor(name)
            except MissingTensorError as err:
                raise AssertionError(f"listed tensor {name!r} reported missing: {err}") from err
        handle.read_metadata()
    return "ok"


def _chain_has_memory_error(err: BaseException) -> bool:
    seen = 0
    cur: BaseException | None = err
    while cur is not None and seen < 20:
        if isinstance(cur, MemoryError):
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


def run_case(reader_name: str, path: Path, *, timeout: float = 10.0, reads: int = 4) -> str:
    """The outcome of one case: ``"ok"``, ``"error:<GramlinError subclass>"``, or a
    failure: ``"crash:<exception type>"``, ``"hang"`` or ``"memory"``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    # Native code looping forever never sees the alarm: end the process with every
    # thread's traceback rather than stall the suite.
    faulthandler.dump_traceback_later(3 * timeout + 5, exit=True)
    started = time.monotonic()
    try:
        outcome = _exercise(reader_name, path, reads)
    except CaseTimeout:
        outcome = "hang"
    except GramlinError as err:
        outcome = "memory" if _chain_has_memory_error(err) else f"error:{type(err).__name__}"
        if " reader failed (" in str(err):  # unforeseen by the reader, caught by the guard
            outcome += f"(guard: {type(err.__cause__).__name__}) {err}"
    except Exception as err:  # the failure this fuzzer exists to find
        outcome = f"crash:{type(err).__name__}: {str(err)[:160]}"
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if outcome != "hang" and time.monotonic() - started > timeout:
        outcome = "hang"
    if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss > _MEMORY_BOUND:
        outcome = "memory"
    return outcome


def _mutant(fixture: Fixture, work: Path, rng: random.Random) -> tuple[Path, str]:
    """A copy of the fixture with one file mutated, under ``work``."""
    work.mkdir(parents=True)
    if fixture.path.is_dir():
        path = work / fixture.path.name
        shutil.copytree(fixture.path, path)
        target = path / rng.choice(fixture.targets)
    else:
        path = target = work / fixture.path.name
    source = fixture.path / target.relative_to(path) if fixture.path.is_dir() else fixture.path
    data, kind = mutate(source.read_bytes(), rng)
    target.unlink(missing_ok=True)
    target.write_bytes(data)
    return path, kind


def is_failure(outcome: str) -> bool:
    return not (outcome == "ok" or outcome.startswith("error:"))


def campaign(
    fixtures: list[Fixture],
    cases: int,
    work: Path,
    *,
    seed: int = 0,
    timeout: float = 10.0,
    weights: dict[str, float] | None = None,
) -> Report:
    """``cases`` mutants spread over the fixtures (``weights`` per reader, default 1),
    each in a fresh directory under ``work`` removed after its case."""
    rng = random.Random(seed)
    w = [(weights or {}).get(f.reader, 1.0) for f in fixtures]
    report = Report()
    for i in range(cases):
        fixture = rng.choices(fixtures, weights=w)[0]
        case_dir = work / f"case{i}"
        path, kind = _mutant(fixture, case_dir, rng)
        outcome = run_case(fixture.reader, path, timeout=timeout)
        label = outcome.split(")", 1)[0] + (")" if "(" in outcome else "")
        label = label if label.startswith("error") else outcome.split(":", 1)[0]
        report.outcomes[(fixture.reader, label)] += 1
        report.cases += 1
        line = f"case {i} (seed {seed}) {fixture.path.name} {kind}: {outcome}"
        if is_failure(outcome):
            report.failures.append(line)
        elif "(guard:" in outcome:
            report.guarded.append(line)
        shutil.rmtree(case_dir, ignore_errors=True)
    return report
