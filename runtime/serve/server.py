"""uvicorn's Server, with a shutdown that drains the batchers first."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import uvicorn


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT runs `drain` (the batchers refuse new work, the API answers it
    with 503, running requests finish up to the deadline) and then stops; a second signal
    stops at once. The signal is not re-raised afterwards as uvicorn would, so the process
    exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain = drain
        self.draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining:
            self.force_exit = self.should_exit = True
            return
        self.draining = True
        threading.Thread(target=self._drain_then_exit, name="sdrt-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        self.drain()
        self.should_exit = True
