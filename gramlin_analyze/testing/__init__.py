"""Test suites for third-party extensions, as zarr ships its store tests.

:class:`ReaderConformance`: subclass it in a reader's test module, give the
reader's registered name and one fixture, ``written``, that writes a tiny real
checkpoint with the framework's own saving code (needs pytest).
"""

from gramlin_analyze.testing.readers import ReaderConformance, Written, seeded_arrays

__all__ = ["ReaderConformance", "Written", "seeded_arrays"]
