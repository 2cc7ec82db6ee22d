"""``ingest``: checkpoints -> store, one task per checkpoint.

In stages (``driver``): check and plan without writing (``plan``: scan, layer
template, the capture setup; ``checks``: the inputs against the run and the
store; ``stored``: what the store holds), open the write session, write the
plan (``write``), run the tasks (``task``: read one checkpoint, one tensor at a
time, and write its own step's chunks), record each result in the ``/steps``
manifest (``record``). A step becomes ``ok`` only after its task has written
every array of it, so a killed ingest is finished by the next run, and an
unchanged checkpoint (same fingerprint, status ``ok``) is never read again.
``template``: the layers of a checkpoint. ``watch`` (with ``complete``, which
checkpoints of a live run are complete, and ``notify``) follows a live run.
"""

from gramlin_analyze.ingest.driver import IngestReport, default_store_path, ingest
from gramlin_analyze.ingest.watch import WatchPass, WatchReport, watch

__all__ = ["IngestReport", "WatchPass", "WatchReport", "default_store_path", "ingest", "watch"]

# documented where users import them
for _obj in (IngestReport, WatchPass, WatchReport, default_store_path, ingest, watch):
    _obj.__module__ = __name__
del _obj
