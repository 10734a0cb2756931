"""An in-memory store for uploads and generated media served under /v1/files/{id}.

Generated media are fetch-once (the first GET deletes them) and every entry expires, so a client
that never fetches cannot fill memory; past `max_bytes` the oldest entries are evicted.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from nextgpt.serving.limits import LimitExceeded


@dataclass(frozen=True)
class StoredFile:
    id: str
    data: bytes
    mime_type: str
    filename: str
    purpose: str
    created_at: int
    expires_at: float
    once: bool  # deleted by the first fetch


class FileStore:
    def __init__(
        self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._files: OrderedDict[str, StoredFile] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(
        self, data: bytes, mime_type: str, filename: str, purpose: str, once: bool
    ) -> StoredFile:
        if len(data) > self.max_bytes:
            raise LimitExceeded(
                f"file of {len(data)} bytes exceeds the store's limit of {self.max_bytes} bytes"
            )
        now = self._clock()
        item = StoredFile(
            id=f"file-{secrets.token_urlsafe(16)}",
            data=data,
            mime_type=mime_type,
            filename=filename,
            purpose=purpose,
            created_at=int(now),
            expires_at=now + self.ttl_s,
            once=once,
        )
        with self._lock:
            self._purge(now)
            while self._files and self._bytes + len(data) > self.max_bytes:
                self._remove(next(iter(self._files)))
            self._files[item.id] = item
            self._bytes += len(data)
        return item

    def get(self, file_id: str) -> StoredFile | None:
        """The entry if it exists and has not expired; a fetch-once entry stays."""
        with self._lock:
            self._purge(self._clock())
            return self._files.get(file_id)

    def take(self, file_id: str) -> StoredFile | None:
        """Like `get`, but a fetch-once entry is removed by this call."""
        with self._lock:
            self._purge(self._clock())
            item = self._files.get(file_id)
            if item is not None and item.once:
                self._remove(file_id)
            return item

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def _purge(self, now: float) -> None:
        for file_id in [k for k, v in self._files.items() if v.expires_at <= now]:
            self._remove(file_id)

    def _remove(self, file_id: str) -> None:
        self._bytes -= len(self._files.pop(file_id).data)
