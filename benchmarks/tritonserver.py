"""Start and stop a local Triton Inference Server on a model repository (tests, benchmarks).

Uses the `tritonserver` binary that the nvidia-pytriton wheel ships, from the venv that
`scripts/install.sh --test` builds (.venv-triton): it runs python-backend models on the CPU.
The python backend starts a stub process per model instance that embeds libpython, found through
LD_LIBRARY_PATH (this interpreter's LIBDIR). The stub is built against numpy 1, so the model
runs in .venv-triton too (numpy<2, the runtime's wheels, sdrt): pass `triton_venv()` as
`sdrt triton-repo --python-env`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from sdrt.errors import UserError

from .serve_process import free_port

TRITON_VENV_ENV = "SDRT_TRITON_VENV"  # default: the repository's .venv-triton
READY_TIMEOUT_S = 120.0


def triton_venv() -> Path:
    """The venv holding nvidia-pytriton and the model's runtime (numpy<2, sdrt)."""
    if os.environ.get(TRITON_VENV_ENV):
        return Path(os.environ[TRITON_VENV_ENV])
    return Path(__file__).resolve().parents[1] / ".venv-triton"


def triton_home() -> Path:
    """The folder holding bin/tritonserver and backends/ (with the python stub copied in)."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return triton_venv() / "lib" / version / "site-packages" / "pytriton" / "tritonserver"


def find_tritonserver() -> Path:
    home = triton_home()
    binary = home / "bin" / "tritonserver"
    stub = home / "backends" / "python" / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise UserError(
            f"no tritonserver with a python backend stub under {home}; run scripts/install.sh "
            f"--test (it builds .venv-triton) or set {TRITON_VENV_ENV}"
        )
    return binary


class TritonServer:
    """A tritonserver child process on 127.0.0.1; use as a context manager."""

    def __init__(self, repository: str | Path, log: str | Path) -> None:
        self.repository = Path(repository)
        self.log_path = Path(log)
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> TritonServer:
        binary = find_tritonserver()
        command = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={binary.parents[1] / 'backends'}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=10",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self._environment()
            )
        self._wait_ready(timeout_s)
        return self

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a bounded wait; returns the exit code."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return None if self.process is None else self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p
        )
        return env

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with {self.process.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout_s} s:\n{self.log()[-4000:]}")
