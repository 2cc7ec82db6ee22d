"""A real S3 server (moto's) on loopback that counts the requests it serves.

Request counts on an object store are what a remote store's speed comes
down to (each is a round trip, tens of ms on a real endpoint), and unlike
timings they are deterministic, so tests can bound them. moto's server keeps
no request log of its own; here its WSGI application runs behind a small
middleware that records each request's method and key, and the server is
werkzeug's threaded one, as moto's ``ThreadedMotoServer`` uses.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import unquote

import boto3

#: Environment that keeps S3 clients on loopback with fake credentials.
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    key: str  # the object key, without the bucket; "" for a bucket-level request (a listing)
    query: str


def key_kind(req: Request) -> str:
    """What a request touched: ``root`` (the root ``zarr.json``, which holds the
    consolidated metadata), ``zarr.json`` (another node's metadata), ``lock``,
    ``list`` (a bucket listing), ``delete`` (a batch delete) or ``chunk`` (anything else under a store)."""
    if not req.key:
        return "delete" if "delete" in req.query else "list"
    name = req.key.rsplit("/", 1)[-1]
    if req.key.endswith(".lock"):
        return "lock"
    if name == "zarr.json":
        return "root" if req.key.count("/") <= _store_depth(req.key) else "zarr.json"
    return "chunk"


def _store_depth(key: str) -> int:
    """Slashes before a store's root ``zarr.json``: its store directory ends in ``.zarr``."""
    parts = key.split("/")
    for i, part in enumerate(parts):
        if part.endswith(".zarr"):
            return i + 1
    return 0


class RequestLog:
    """WSGI middleware recording every request before handing it to ``app``."""

    def __init__(self, app, bucket: str):
        self.app = app
        self.bucket = bucket
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = unquote(environ.get("PATH_INFO", "")).lstrip("/")
        bucket, _, key = path.partition("/")
        if bucket == self.bucket:
            req = Request(environ["REQUEST_METHOD"], key, environ.get("QUERY_STRING", ""))
            with self._lock:
                self.requests.append(req)
        return self.app(environ, start_response)

    def mark(self) -> int:
        """A position in the log: :meth:`since` returns what came after it."""
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[Request]:
        with self._lock:
            return list(self.requests[mark:])


def tally(requests: list[Request]) -> Counter[tuple[str, str]]:
    """Requests by ``(method, kind)`` (see :func:`key_kind`)."""
    return Counter((r.method, key_kind(r)) for r in requests)


@dataclass
class CountingS3:
    endpoint: str
    storage_options: dict
    client: object  # boto3 S3 client
    bucket: str
    log: RequestLog
    env: dict[str, str] = field(default_factory=lambda: dict(_ENV))


@contextmanager
def counting_s3(bucket: str = "gramlin-count") -> Iterator[CountingS3]:
    """A moto S3 server on 127.0.0.1 with one bucket, every request logged."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a log line per request
    log = RequestLog(DomainDispatcherApplication(create_backend_app), bucket)
    server = make_server("127.0.0.1", 0, log, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ.update(_ENV)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        options = {
            "key": "testing",
            "secret": "testing",
            "anon": False,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        yield CountingS3(endpoint, options, client, bucket, log)
    finally:
        server.shutdown()
        thread.join()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
