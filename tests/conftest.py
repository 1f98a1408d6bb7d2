"""Shared fixtures: stores on every backend, and moto in server mode (a real HTTP S3 endpoint on
loopback). Never moto's in-process mock: s3fs and pyarrow need a real endpoint."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ttstore import Store

# Credentials for moto; set before anything creates an S3 client.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """An in-process ``ThreadedMotoServer`` on a fixed loopback port.

    ``stop()``/``start()`` simulate an S3 outage without losing objects: moto keeps its state in
    this process, and the endpoint comes back on the same port.
    """

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._cls = ThreadedMotoServer
        self._server = None

    def start(self) -> None:
        self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def create_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"tt-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        yield server
    finally:
        server.stop()
        if old is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = old


@pytest.fixture
def s3_store(moto_server: MotoServer) -> Store:
    """A fresh bucket on the moto server, with a prefix."""
    return Store(f"s3://{moto_server.create_bucket()}/tt")


@pytest.fixture
def local_store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same test on every backend: a local directory and S3 on a moto server."""
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    moto: MotoServer = request.getfixturevalue("moto_server")
    return Store(f"s3://{moto.create_bucket()}/tt")
