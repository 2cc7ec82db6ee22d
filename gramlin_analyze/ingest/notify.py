"""Waking ``watch`` when a run directory changes: file-system notifications through
``watchdog`` when it is installed (an optional extra), else plain polling."""

from __future__ import annotations

import threading
from pathlib import Path

__all__ = ["Wakeup"]


class Wakeup:
    """``wait(timeout)`` returns early when something under ``root`` changed (with watchdog),
    else after ``timeout``; ``close()`` stops the observer. ``notifying`` says which."""

    def __init__(self, root: Path, *, notify: bool = True) -> None:
        self._changed = threading.Event()
        self._observer = None
        if notify:
            self._observer = _observer(root, self._changed)
        self.notifying = self._observer is not None

    def wait(self, timeout: float) -> bool:
        """Whether a change was signalled within ``timeout`` seconds (cleared on return)."""
        changed = self._changed.wait(timeout)
        self._changed.clear()
        return changed

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def __enter__(self) -> Wakeup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _observer(root: Path, changed: threading.Event):
    """A started watchdog observer of ``root`` that sets ``changed`` on any event; None
    when watchdog is not installed or cannot watch here (polling serves then)."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        return None

    class _Handler(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            changed.set()

    observer = Observer()
    try:
        observer.schedule(_Handler(), str(root), recursive=True)
        observer.start()
    except OSError:  # out of inotify watches, a file system without notifications
        return None
    return observer
