"""``ingest``: checkpoints -> store, one task per checkpoint.

In stages (``driver``): check and plan without writing (``plan``: scan, layer
template, the capture setup; ``checks``: the inputs against the run and the
store; ``stored``: what the store holds), open the write session, write the
plan (``write``), run the tasks (``task``: read one checkpoint, one tensor at a
time, and write its own step's chunks), record each result in the ``/steps``
manifest (``record``). A step becomes ``ok`` only after its task has written
every array of it, so a killed ingest is finished by the next run, and an
unchanged checkpoint (same fingerprint, status ``ok``) is never read again.
``template``: the layers of a checkpoint.
"""

from gramlin_analyze.ingest.driver import IngestReport, default_store_path, ingest

__all__ = ["IngestReport", "default_store_path", "ingest"]

for _obj in (IngestReport, default_store_path, ingest):  # documented where users import them
    _obj.__module__ = __name__
del _obj
