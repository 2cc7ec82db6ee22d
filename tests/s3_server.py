"""A real S3 server (moto's) on loopback, shared by the tests that need one.

s3fs and boto3 talk to it over sockets exactly as they would to AWS; a bound
socket that never listens catches any client that forgets the endpoint.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import boto3
import pytest
from moto.server import ThreadedMotoServer

S3_BUCKET = "gramlin-test"


@dataclass(frozen=True)
class S3:
    endpoint: str
    storage_options: dict
    client: object  # boto3 S3 client, for looking behind gramlin's back
    bucket: str = "gramlin-test"

    def sizes(self, prefix: str) -> dict[str, int]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def keys(self, prefix: str) -> set[str]:
        return set(self.sizes(prefix))


@contextmanager
def moto_s3(bucket: str = "gramlin-test") -> Iterator[S3]:
    """A moto S3 server on 127.0.0.1 with one bucket (the ``s3_server`` fixture)."""
    # A bound socket that never listens: any S3 client that forgets the
    # endpoint below is refused on loopback instead of reaching AWS.
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one log line per request drowns failures
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            mp.setenv("AWS_CONFIG_FILE", "/dev/null")
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{sink.getsockname()[1]}")
            mp.setenv("NO_PROXY", "127.0.0.1,localhost")
            mp.setenv("no_proxy", "127.0.0.1,localhost")
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=bucket)
            options = {
                "key": "testing",
                "secret": "testing",
                "anon": False,
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
            yield S3(endpoint, options, client, bucket)
    finally:
        server.stop()
        sink.close()
        werkzeug_log.setLevel(level)
