"""Discovery: find the checkpoints of a run directory and the step of each.

``scan`` walks a directory, groups the files that form one checkpoint
(sharded safetensors, Hugging Face ``checkpoint-N/`` directories, orbax step
directories), finds each checkpoint's step from its name or, failing that,
its metadata, and fingerprints it. It reads no tensor bytes. Names that look
like checkpoints but are special files (FIFOs, sockets, devices, links to
them) or dangling links are never opened: they are listed in
:attr:`ScanResult.skipped` with the reason, as are files no reader could
recognize because recognizing them failed.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from gramlin_analyze.errors import (
    CheckpointFormatError,
    GramlinError,
    MissingDependencyError,
    StepDiscoveryError,
    UsageError,
)
from gramlin_analyze.io.base import CheckpointMeta, CheckpointReader
from gramlin_analyze.io.fingerprint import fingerprint_files, stat_key
from gramlin_analyze.io.guard import special_file
from gramlin_analyze.io.registry import known_readers, reader_for
from gramlin_analyze.io.remote import RemotePath, as_path

__all__ = [
    "CheckpointSource",
    "ScanResult",
    "scan",
    "step_from_name",
    "fingerprint_files",
    "ORDERS",
]

ORDERS = ("name", "mtime")

# Step patterns, most specific first. Each is searched in one path component.
_STEP_PATTERNS = [
    re.compile(r"(?:^|[^a-z])(?:global_)?step[=_-]?(\d+)", re.IGNORECASE),
    re.compile(r"checkpoint[=_-](\d+)", re.IGNORECASE),
    re.compile(r"(?:^|[^a-z])(?:ckpt|iter|iteration|it)[=_-]?(\d+)", re.IGNORECASE),
]
_PLAIN_INT = re.compile(r"^(\d+)$")
# Lightning appends -v1, -v2 to a name that already exists; the version is not a step.
_VERSION_SUFFIX = re.compile(r"-v\d+$")
_SUFFIXES = re.compile(
    r"(\.safetensors\.index\.json|\.bin\.index\.json|\.weights\.h5|\.safetensors|\.ckpt|\.pth|\.pt"
    r"|\.bin|\.npz|\.msgpack|\.flax|\.onnx|\.h5)$",
    re.IGNORECASE,
)

# Names of files and directories that are still being written or are scratch.
_TEMP_NAME = re.compile(
    r"(\.orbax-checkpoint-tmp.*|\.tmp\d*|\.temp|\.part|\.partial|\.incomplete|\.lock|~)$"
    r"|^(tmp-|tmp_|\.)",
    re.IGNORECASE,
)

# Sidecar files that belong to a checkpoint but are not weights.
_NOT_WEIGHTS = re.compile(
    # gramlin_record.safetensors: gramlin_analyze.record's sidecar of a checkpoint
    r"^(optimizer|scheduler|rng_state|scaler|training_args|trainer_state)\b|\.json$|\.txt$|\.md$|\.yaml$|\.yml$"
    r"|gramlin_record\.safetensors$",
    re.IGNORECASE,
)


@dataclass
class CheckpointSource:
    """One checkpoint of a run, as found by :func:`scan`."""

    path: Path
    format: str
    files: list[Path]
    step: int | None
    step_origin: str
    bytes: int
    fingerprint: str
    mtime: float
    meta: CheckpointMeta = field(default_factory=CheckpointMeta)
    #: size, mtime and inode of ``files``: equal keys mean files untouched since
    stat_key: str = ""
    #: the training-time record beside it (``gramlin_analyze.record``), also in ``files``
    record: Path | None = None

    @property
    def source_path(self) -> str:
        return str(self.path)


def step_from_name(path: str | os.PathLike, root: str | os.PathLike | None = None) -> int | None:
    """The step a checkpoint's name gives, or None.

    The checkpoint's own name is tried first, then its parent directories up
    to ``root`` (``run/step_100/model.safetensors`` is step 100).

    >>> step_from_name("epoch=3-step=1200-v1.ckpt")
    1200
    >>> step_from_name("checkpoint-500")
    500
    >>> step_from_name("step1000-tokens2B")
    1000
    >>> step_from_name("ckpt_000120.pt")
    120
    >>> step_from_name("runs/orbax/300")
    300
    """
    p = Path(path)
    parts = [p.name]
    if root is not None:
        try:
            rel = p.parent.relative_to(root)
            parts += [q for q in reversed(rel.parts)]
        except ValueError:
            pass
    for part in parts:
        stem = _VERSION_SUFFIX.sub("", _SUFFIXES.sub("", part))
        m = _PLAIN_INT.match(stem)
        if m:
            return int(m.group(1))
        for pat in _STEP_PATTERNS:
            m = pat.search(stem)
            if m:
                return int(m.group(1))
    return None


def _readers(format: str | None, reader_options: dict | None) -> list[CheckpointReader]:
    if format is not None:
        return [reader_for(format, reader_options)]
    out = []
    for name in known_readers():
        try:
            out.append(reader_for(name, reader_options))
        except MissingDependencyError:
            continue
    return out


def _remote_readers(
    readers: list[CheckpointReader], format: str | None, storage_options: dict | None
) -> list[CheckpointReader]:
    """The readers that read through fsspec, each given the URL's storage options."""
    usable = [r for r in readers if r.reads_urls]
    if format is not None and not usable:
        raise UsageError(
            f"the {format} reader reads local files only; copy the checkpoints to a local "
            "directory, or save them as safetensors, PyTorch or .npz files"
        )
    if not storage_options:
        return usable
    out = []
    for r in usable:
        r = copy.copy(r)  # registry instances are shared: configure a copy
        r.storage_options = storage_options
        out.append(r)
    return out


Skipped = list[tuple[Path, str]]


def _claim(
    readers: list[CheckpointReader],
    path: Path,
    *,
    directory: bool,
    skipped: Skipped | None = None,
) -> CheckpointReader | None:
    """The first reader that recognizes ``path``. A reader failing to tell is passed
    over; when none claims the path, the failure goes to ``skipped``."""
    failures = []
    for r in readers:
        if r.is_directory_format != directory:
            continue
        try:
            if r.guess_can_read(path):
                return r
        except (GramlinError, OSError) as err:
            failures.append(f"the {r.name} reader could not tell its format ({err})")
    if failures and skipped is not None:
        skipped.append((path, "; ".join(failures)))
    return None


def _looks_like_checkpoint(name: str) -> bool:
    return bool(_SUFFIXES.search(name)) and not (
        _TEMP_NAME.search(name) or _NOT_WEIGHTS.search(name)
    )


def _walk(
    root: Path, readers: list[CheckpointReader], skipped: Skipped
) -> list[tuple[Path, CheckpointReader]]:
    """Every checkpoint under ``root`` with its reader; what looks like one but is not
    readable (special files, dangling links, failed recognition) goes to ``skipped``."""
    found: list[tuple[Path, CheckpointReader]] = []
    if root.is_file():
        r = _claim(readers, root, directory=False, skipped=skipped)
        if r is None:
            why = f" ({skipped[-1][1]})" if skipped else ""
            raise CheckpointFormatError(
                f"{root}: no checkpoint reader recognizes this file{why}; pass --format NAME"
            )
        return [(root, r)]
    if isinstance(root, RemotePath):
        return _walk_remote(root, readers)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not _TEMP_NAME.search(n))
        r = _claim(readers, d, directory=True)
        if r is not None:
            found.append((d, r))
            dirnames[:] = []
            continue
        claimed: set[str] = set()
        for name in sorted(filenames):
            if name.endswith(".index.json"):
                p = d / name
                r = _claim(readers, p, directory=False)
                if r is not None:
                    found.append((p, r))
                    claimed.update(f.name for f in r.files(p))
        for name in sorted(filenames):
            if name in claimed or _TEMP_NAME.search(name) or _NOT_WEIGHTS.search(name):
                continue
            p = d / name
            kind = special_file(p) if _looks_like_checkpoint(name) else None
            if kind is not None:
                skipped.append((p, f"{kind}; not opened"))
                continue
            r = _claim(readers, p, directory=False, skipped=skipped)
            if r is not None:
                found.append((p, r))
    return found


def _walk_remote(
    root: RemotePath, readers: list[CheckpointReader]
) -> list[tuple[Path, CheckpointReader]]:
    """Single-file checkpoints in an object listing (one request per page of keys);
    the scratch and sidecar names skipped as in a local walk."""
    found: list[tuple[Path, CheckpointReader]] = []
    for f in root.files():
        parts = f.relative_to(root).parts[:-1]
        if any(_TEMP_NAME.search(p) for p in parts) or _TEMP_NAME.search(f.name):
            continue
        if _NOT_WEIGHTS.search(f.name):
            continue
        for r in readers:
            if not r.is_directory_format and any(f.name.endswith(x) for x in r.suffixes):
                found.append((cast(Path, f), r))
                break
    return found


def scan(
    root: str | os.PathLike,
    *,
    format: str | None = None,
    order: str | None = None,
    reader_options: dict | None = None,
    settle_seconds: float = 0.0,
    known: dict[str, tuple[str, str]] | None = None,
    storage_options: dict | None = None,
) -> list[CheckpointSource]:
    """Find every checkpoint under ``root``, sorted by step.

    Parameters
    ----------
    root
        A run directory (searched recursively) or a single checkpoint.
    format
        Use only this reader (a registry name); by default each file is
        claimed by the first reader that recognizes it.
    order
        How to resolve ambiguity: ``"name"`` or ``"mtime"``. When several
        checkpoints claim one step, the last in this order is kept (so
        Lightning's ``-v1`` copy or the newest file wins) and the others are
        reported in ``skipped``; when no checkpoint has a step, steps are
        their rank in this order. Without it, ambiguity is an error.
    reader_options
        Options for the PyTorch readers (``state_dict_key``).
    settle_seconds
        Skip files modified less than this many seconds ago (they may still
        be being written).
    known
        ``{source_path: (stat_key, fingerprint)}`` from an earlier scan (the
        store's manifest): a checkpoint whose files have the same
        :func:`stat_key` keeps its fingerprint instead of being hashed again.
    storage_options
        fsspec options when ``root`` is a URL (``s3://bucket/run``, ``memory://run``);
        by default ``reader_options["storage_options"]``. Behind a URL, only
        single-file formats that read through fsspec are found (safetensors,
        PyTorch files, ``.npz``).

    Raises
    ------
    StepDiscoveryError
        Two checkpoints claim one step, or a checkpoint has no step, and
        ``order`` was not given. The message lists the files.
    """
    if order is not None and order not in ORDERS:
        raise UsageError(f"order must be one of {ORDERS}, not {order!r}")
    if storage_options is None:
        storage_options = (reader_options or {}).get("storage_options")
    root = cast(Path, as_path(root, storage_options))
    if not isinstance(root, RemotePath) and (kind := special_file(root)) is not None:
        raise UsageError(f"{root}: {kind}; it was not opened; pass a run directory or a checkpoint")
    if not root.exists():
        raise UsageError(f"{root}: no such file or directory")
    readers = _readers(format, reader_options)
    if isinstance(root, RemotePath):
        readers = _remote_readers(readers, format, storage_options)
    now = time.time()
    sources: list[CheckpointSource] = []
    skipped: Skipped = []
    for path, reader in _walk(root, readers, skipped):
        try:
            source = _source(
                path, reader, root, now=now, settle_seconds=settle_seconds, known=known
            )
        except (GramlinError, OSError) as err:
            skipped.append((path, f"its files cannot be listed ({err})"))
            continue
        if source is not None:
            sources.append(source)
    _fingerprint_all([s for s in sources if not s.fingerprint])
    result = _resolve_steps(sources, order)
    result.skipped = skipped + result.skipped
    return result


def _source(
    path: Path,
    reader: CheckpointReader,
    root: Path,
    *,
    now: float,
    settle_seconds: float,
    known: dict[str, tuple[str, str]] | None,
) -> CheckpointSource | None:
    """The checkpoint at ``path``, its fingerprint kept from ``known`` when its files are
    untouched (else left empty); None when it has no files or one was modified less
    than ``settle_seconds`` before ``now`` (it may still be being written)."""
    files = reader.files(path)
    if not files:
        return None
    record = _record_of(path)  # in the fingerprint: a record written later redoes the step
    if record is not None and record not in files:
        files = [*files, record]
    stats = [f.stat() for f in files]
    mtime = max(s.st_mtime for s in stats)
    if settle_seconds and now - mtime < settle_seconds:
        return None
    step, origin, meta = _step_of(path, reader, root)
    key = stat_key(files, stats)
    cached = (known or {}).get(str(path))
    return CheckpointSource(
        path=path,
        format=reader.name,
        files=files,
        step=step,
        step_origin=origin,
        bytes=sum(s.st_size for s in stats),
        fingerprint=cached[1] if cached is not None and cached[0] == key and cached[1] else "",
        mtime=mtime,
        meta=meta,
        stat_key=key,
        record=record,
    )


def _record_of(path: Path) -> Path | None:
    """The training-time record of a local checkpoint, named as ``record.file.record_path``."""
    if isinstance(path, RemotePath):
        return None
    name = "gramlin_record.safetensors"
    cand = path / name if path.is_dir() else path.with_name(f"{path.name.rsplit('.', 1)[0]}.{name}")
    return cand if special_file(cand) is None and cand.is_file() else None


def _step_of(
    path: Path, reader: CheckpointReader, root: Path
) -> tuple[int | None, str, CheckpointMeta]:
    """A checkpoint's step and where it came from: its name, else its metadata (read
    only then; unreadable metadata gives no step)."""
    step = step_from_name(path, root if root.is_dir() else None)
    if step is not None:
        return step, "name", CheckpointMeta()
    try:
        meta = reader.read_metadata(path)
    except (GramlinError, OSError):
        meta = CheckpointMeta()
    return meta.step, "metadata" if meta.step is not None else "none", meta


def _fingerprint_all(sources: list[CheckpointSource]) -> None:
    """Set each source's fingerprint, a few files at a time: blake2b releases
    the GIL while it hashes, so threads overlap."""
    from concurrent.futures import ThreadPoolExecutor

    def one(s: CheckpointSource) -> str:
        return fingerprint_files(s.files, s.path if s.path.is_dir() else s.path.parent)

    if len(sources) < 2:
        prints = [one(s) for s in sources]
    else:
        with ThreadPoolExecutor(
            min(len(sources), os.cpu_count() or 1, 8), thread_name_prefix="gramlin-scan"
        ) as pool:
            prints = list(pool.map(one, sources))
    for s, fp in zip(sources, prints, strict=True):
        s.fingerprint = fp


_VERSIONED = re.compile(r"-v(\d+)(?=(\.[^/]*)?$)")


def _name_key(s: CheckpointSource) -> tuple[str, int]:
    """Sort key by name where Lightning's ``x-v1.ckpt`` comes after ``x.ckpt``."""
    path = str(s.path)
    m = _VERSIONED.search(path)
    if m:
        return (path[: m.start()] + path[m.end() :], int(m.group(1)))
    return (path, 0)


def _order_key(order: str | None) -> Callable[[CheckpointSource], tuple[Any, ...]]:
    if order == "mtime":
        return lambda s: (s.mtime, _name_key(s))
    return _name_key


class ScanResult(list):
    """The checkpoints found, sorted by step; ``skipped`` holds ``(path, why)`` pairs."""

    def __init__(self, sources=(), skipped=()):
        super().__init__(sources)
        self.skipped: list[tuple[Path, str]] = list(skipped)


def _resolve_steps(sources: list[CheckpointSource], order: str | None) -> ScanResult:
    missing = [s for s in sources if s.step is None]
    if missing and len(missing) == len(sources) and order is not None:
        for i, s in enumerate(sorted(sources, key=_order_key(order))):
            s.step, s.step_origin = i, f"order:{order}"
        return ScanResult(sorted(sources, key=lambda s: s.step))
    if missing:
        listing = "\n  ".join(str(s.path) for s in missing)
        if order is None:
            raise StepDiscoveryError(
                f"no step number found for {len(missing)} checkpoint(s) (not in the name nor "
                f"in the metadata):\n  {listing}\nrename them (e.g. step_100.pt), or pass "
                "--order name|mtime to number all checkpoints by their order"
            )
        raise StepDiscoveryError(
            f"no step number found for {len(missing)} checkpoint(s), while others have one:"
            f"\n  {listing}\nmove or rename them"
        )
    by_step: dict[int, list[CheckpointSource]] = defaultdict(list)
    for s in sources:
        # Every step is set here: checkpoints without one raised above.
        by_step[cast(int, s.step)].append(s)
    dups = {k: v for k, v in by_step.items() if len(v) > 1}
    if dups and order is None:
        lines = [
            f"step {k}: " + ", ".join(str(s.path) for s in sorted(v, key=lambda s: str(s.path)))
            for k, v in sorted(dups.items())
        ]
        raise StepDiscoveryError(
            "several checkpoints claim the same step:\n  "
            + "\n  ".join(lines)
            + "\npass --order name (keep the last by name, e.g. Lightning's -v1 copy) or "
            "--order mtime (keep the newest), or remove the extra files"
        )
    out = ScanResult()
    for k, v in sorted(by_step.items()):
        ranked = sorted(v, key=_order_key(order)) if len(v) > 1 else v
        out.append(ranked[-1])
        out.skipped += [
            (s.path, f"step {k} also claimed by {ranked[-1].path}") for s in ranked[:-1]
        ]
    return out
