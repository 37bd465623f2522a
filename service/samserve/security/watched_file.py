"""A file the gateway re-reads when it changes (a mounted Secret: the API keys file, the JWKS file).

One ``stat`` per read: the file is parsed again when its inode, device, size or modification time changed. A
changed file that cannot be parsed, or one that vanished, keeps the last good version and logs an ERROR once per
version; at construction the same failure is raised (the gateway does not start).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

LOG = logging.getLogger(__name__)
T = TypeVar("T")
Signature = tuple[int, int, int, int]


def _signature(path: Path) -> Signature:
    stat = os.stat(path)
    return stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns


class WatchedFile(Generic[T]):
    """``parse(path)`` of ``path``, kept current. ``parse`` raises ``error`` (an exception type) for a file it
    cannot use; ``what`` names the file in messages ("API keys file")."""

    def __init__(self, path: Path, parse: Callable[[Path], T], what: str, error: type[Exception]) -> None:
        self.path = Path(path)
        self._parse = parse
        self.what = what
        self._error = error
        try:
            signature = _signature(self.path)
        except FileNotFoundError as missing:
            raise error(f"{what} {self.path} does not exist") from missing
        except OSError as unreadable:
            raise error(f"{what} {self.path}: {unreadable.strerror or unreadable}") from unreadable
        self._value = parse(self.path)
        self._signature: object = signature
        self._failed: object = None
        """The signature of a version that failed to parse ("unreadable" while stat fails): logged once."""

    def current(self) -> T:
        """The parsed content, re-parsed first when the file changed."""
        signature: object = None
        try:
            signature = _signature(self.path)
            if signature in (self._signature, self._failed):
                return self._value
            value = self._parse(self.path)
        except (OSError, self._error) as error:
            if isinstance(error, OSError):  # stat failed: the file is gone or its folder unreadable
                signature = "unreadable"
            if signature != self._failed:
                LOG.error("%s %s changed but cannot be used (keeping the version read before): %s", self.what,
                          self.path, error)
            self._failed = signature
            return self._value
        self._value, self._signature, self._failed = value, signature, None
        LOG.info("%s %s re-read", self.what, self.path)
        return value
