"""Run `sdrt serve` as a child process on a free loopback port, and wait until it is ready."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from sdrt.errors import UserError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """`sdrt serve BUNDLES OPTIONS` on 127.0.0.1; `url` once `start` returned."""

    def __init__(
        self, bundles: Sequence[Path], options: Sequence[str] = (), log: Path | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "sdrt.cli",
            "serve",
            *map(str, bundles),
            "--port",
            str(self.port),
            *options,
        ]
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> ServeProcess:
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(
                    f"sdrt serve exited with code {self.process.returncode}: {self.command}"
                )
            try:
                if httpx.get(f"{self.url}/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise UserError(f"sdrt serve was not ready within {timeout_s:.0f} s: {self.command}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (drains), then the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
