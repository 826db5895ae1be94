"""Images answered with `response_format: "url"`: kept in memory for a limited time under a
byte budget, served back by id. When the budget needs room the oldest images go first."""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class StoreFull(Exception):
    """One image is larger than the whole budget."""


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    media_type: str
    expires: float  # on the store's clock


class ImageStore:
    """Thread-safe; `clock` is injectable so expiry can be tested without waiting."""

    def __init__(
        self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s, self.max_bytes, self.clock = ttl_s, max_bytes, clock
        self._images: collections.OrderedDict[str, StoredImage] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, media_type: str, extension: str) -> str:
        """Keep `data` and return its id (unguessable, ends in `.extension`)."""
        if len(data) > self.max_bytes:
            raise StoreFull(
                f"the image ({len(data)} bytes) is larger than the image store "
                f"({self.max_bytes} bytes, --image-store-mb); use b64_json or raise it"
            )
        image_id = f"{secrets.token_urlsafe(24)}.{extension}"
        with self._lock:
            self._drop_expired()
            while self._bytes + len(data) > self.max_bytes:
                _, oldest = self._images.popitem(last=False)
                self._bytes -= len(oldest.data)
            self._images[image_id] = StoredImage(data, media_type, self.clock() + self.ttl_s)
            self._bytes += len(data)
        return image_id

    def get(self, image_id: str) -> StoredImage | None:
        """The image, or None once it expired, was evicted, or never existed."""
        with self._lock:
            self._drop_expired()
            return self._images.get(image_id)

    def _drop_expired(self) -> None:
        now = self.clock()
        while self._images:
            image_id, oldest = next(iter(self._images.items()))
            if oldest.expires > now:
                return
            del self._images[image_id]
            self._bytes -= len(oldest.data)
