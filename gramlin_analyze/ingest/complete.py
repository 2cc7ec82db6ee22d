"""Which checkpoints of a live run are complete: the frameworks' own signals, else a settle time
plus a successful parse. ``watch`` ingests only those, so no half-written file is ever read.

The signals, in order:

- Names that say "still being written" are never looked at (discovery's scratch rule):
  Hugging Face's ``tmp-checkpoint-N`` staging directory, orbax's
  ``*.orbax-checkpoint-tmp-*`` directories, ``*.tmp``/``*.part`` files of atomic savers.
- A Hugging Face Trainer directory is recognized only once ``trainer_state.json``, the
  Trainer's last file, exists; a directory still without it is not a checkpoint yet.
- Every file of a checkpoint, and every other file in its own directory (the optimizer
  state the Trainer writes beside the weights), unmodified for ``settle`` seconds, and
  its stat (size, mtime, inode) the same at two looks: Lightning's save and plain
  ``torch.save`` write the final name directly.
- It parses: its reader lists its tensors (a torch zip's central directory and a
  safetensors header are written last, so a truncated file fails here).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from gramlin_analyze.errors import GramlinError
from gramlin_analyze.io.discovery import CheckpointSource, scan
from gramlin_analyze.io.registry import reader_for

__all__ = ["Completeness"]

_PARSE_ERRORS = (GramlinError, OSError, KeyError, ValueError, RuntimeError, EOFError)


@dataclass
class Completeness:
    """Looks at a run directory again and again; says which checkpoints are complete.

    ``ready()`` returns ``{source_path: stat_key}`` of the complete checkpoints now.
    Fingerprints of files seen before are reused (each file is hashed once), and a
    parse is tried once per file version.
    """

    root: Path
    settle: float
    format: str | None = None
    order: str | None = None
    reader_options: dict = field(default_factory=dict)
    exclude: Path | None = None  # the store, when it lies inside the watched directory
    _seen: dict[str, str] = field(default_factory=dict)  # path -> stat key at the last look
    _known: dict[str, tuple[str, str]] = field(default_factory=dict)
    _parsed: dict[tuple[str, str], bool] = field(default_factory=dict)

    def ready(self) -> dict[str, str]:
        """The complete checkpoints: ``{source_path: stat_key}``."""
        try:
            sources = scan(
                self.root,
                format=self.format,
                order=self.order,
                reader_options=self.reader_options,
                settle_seconds=self.settle,
                known=self._known,
            )
        except OSError:  # a file removed while hashed (a rotated checkpoint): look again later
            return {}
        now = time.time()
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for s in sources:
            path = str(s.path)
            seen[path] = s.stat_key
            self._known[path] = (s.stat_key, s.fingerprint)
            stable = self._seen.get(path) == s.stat_key
            if stable and self._quiet_around(s, now) and self._parses(s):
                out[path] = s.stat_key
        self._seen = seen
        return out

    def newest_mtime(self) -> float:
        """The newest modification time under the root (the store left out): activity."""
        newest = 0.0
        for dirpath, dirnames, filenames in os.walk(self.root):
            if self.exclude is not None:
                dirnames[:] = [n for n in dirnames if Path(dirpath, n).resolve() != self.exclude]
            for name in filenames:
                try:
                    newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
                except OSError:  # removed meanwhile (a rotated checkpoint)
                    continue
        return newest

    def _quiet_around(self, s: CheckpointSource, now: float) -> bool:
        """No file in the checkpoint's own directory was modified within ``settle`` seconds
        (for a directory checkpoint: no file under it); the run root's other files aside."""
        if s.path.is_dir():
            folder, recursive = s.path, True
        elif s.path.parent != self.root:
            folder, recursive = s.path.parent, False
        else:
            return True
        for dirpath, _dirnames, filenames in os.walk(folder):
            for name in filenames:
                try:
                    mtime = os.stat(os.path.join(dirpath, name)).st_mtime
                except OSError:
                    return False
                if now - mtime < self.settle:
                    return False
            if not recursive:
                break
        return True

    def _parses(self, s: CheckpointSource) -> bool:
        """Its reader lists its tensors (once per file version)."""
        key = (str(s.path), s.stat_key)
        if key not in self._parsed:
            try:
                reader_for(s.format, self.reader_options).list_tensors(s.path)
                self._parsed[key] = True
            except _PARSE_ERRORS:
                self._parsed[key] = False
        return self._parsed[key]
