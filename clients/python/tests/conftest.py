"""Fixtures: every test gets its own `nerve-server` child process and a client connected to it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nerve_client import Client

REPO = Path(__file__).resolve().parents[3]
DEFAULT_BIN = REPO / "target" / "debug" / "nerve-server"
#: Longest any single expected event may take before a test fails.
WAIT = 10.0

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ADDR = re.compile(r"addr=(\S+)")


class ServerProcess:
    """A `nerve-server` started with `--listen 127.0.0.1:0` on a fresh data dir; `addr` comes from its log.

    ``settings`` are extra environment variables for it (``NERVE_CONNECTIONS__MAX_STREAMS_PER_PRINCIPAL``).
    """

    def __init__(self, binary: Path, settings: dict[str, str] | None = None) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="nerve-py-test-")
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG" and not k.startswith("NERVE_")}
        env.update(NERVE_LOG_LEVEL="info", NO_COLOR="1")
        env.update(settings or {})
        self.process = subprocess.Popen(
            [str(binary), "--listen", "127.0.0.1:0", "--data-dir", self.data_dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.log: list[str] = []
        found = threading.Event()
        self.addr = ""

        def drain() -> None:  # reads the log until the child exits, so it never blocks on a full pipe
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                match = _ADDR.search(_ANSI.sub("", line))
                if match and not self.addr:
                    self.addr = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(WAIT) or not self.addr:
            self.stop()
            raise RuntimeError("nerve-server did not report its listen address:\n" + "".join(self.log[-20:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class JwtServer(ServerProcess):
    """A `nerve-server` with JWT authentication on: HS256 tokens of :attr:`issuer` for :attr:`audience`, no
    leeway, and ``policy`` (TOML) as its policy file. :meth:`token` mints tokens it accepts.

    Without TLS on a loopback address the server starts, warning that tokens travel in the clear.
    """

    issuer = "https://issuer.nerve.test"
    audience = "nerve"

    def __init__(self, binary: Path, policy: str, settings: dict[str, str] | None = None) -> None:
        self.config_dir = Path(tempfile.mkdtemp(prefix="nerve-py-auth-"))
        self.secret = secrets.token_hex(32).encode()  # the server trims the file: no whitespace in it
        secret_file = self.config_dir / "hs256.secret"
        secret_file.write_bytes(self.secret)
        policy_file = self.config_dir / "policy.toml"
        policy_file.write_text(policy)
        auth = {
            "NERVE_AUTH__JWT__ISSUER": self.issuer,
            "NERVE_AUTH__JWT__AUDIENCE": self.audience,
            "NERVE_AUTH__JWT__ALGORITHMS": "HS256",
            "NERVE_AUTH__JWT__HS_SECRET_FILE": str(secret_file),
            "NERVE_AUTH__JWT__LEEWAY": "0s",
            "NERVE_AUTH__POLICY_FILE": str(policy_file),
        }
        try:
            super().__init__(binary, {**auth, **(settings or {})})
        except BaseException:
            shutil.rmtree(self.config_dir, ignore_errors=True)
            raise

    def token(self, subject: str, expires: int, *, secret: bytes | None = None) -> str:
        """An HS256 JWT for ``subject`` that expires at ``expires`` (unix seconds), signed with the server's
        secret unless another is given."""
        header = {"alg": "HS256", "typ": "JWT"}
        claims = {"sub": subject, "iss": self.issuer, "aud": self.audience, "exp": expires}
        signed = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims))
        signature = hmac.new(self.secret if secret is None else secret, signed.encode(), hashlib.sha256).digest()
        return f"{signed}.{_b64url(signature)}"

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.config_dir, ignore_errors=True)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def server_binary() -> Path:
    binary = Path(os.environ.get("NERVE_SERVER_BIN") or DEFAULT_BIN)
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"nerve-server binary not found at {binary}: run `cargo build --bin nerve-server` in {REPO} "
            "(or point NERVE_SERVER_BIN at a built nerve-server)",
            pytrace=False,
        )
    return binary


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(server_binary())
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[Client]:
    async with Client.connect(server.addr, ready_timeout=WAIT) as c:
        yield c
