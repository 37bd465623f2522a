"""Writing into a folder that several processes share (``SAMSERVE_WORKDIR``: in Kubernetes a volume that the init
containers of several pods prepare at once, while running Triton pods read the repository in it).

* :func:`exclusive_lock`: an advisory ``flock`` on a lock file, held for a whole step (``prepare`` holds
  ``<workdir>/.prepare.lock``); a second process logs that it waits and then finds the work done. The kernel
  releases the lock when its holder exits, crashed or not, so a stale lock cannot block anyone. (``flock`` locks
  hold across hosts on NFSv4, which Linux maps to byte-range locks.)
* :func:`unique_dir`: a staging folder of a unique name beside the final one (one file system, so the final
  rename is atomic), created with the process's umask (``tempfile.mkdtemp`` would make it 0700, unreadable by a
  Triton running as another user once renamed into place).
* :func:`replace_dir`: a folder replaced by a finished staging folder, the old one deleted only afterwards.
* :func:`publish_version`: a folder served through a symlink, ``<name>`` -> ``<name>.<UTC time>-<random>``. A new
  version is renamed into place complete, then the link is switched with ``rename(2)`` of a new link over the old
  one, so a reader always finds a whole version, old or new. The version the link pointed to before is kept
  (a Triton that resolved it just before the switch still reads it, and open files stay readable in any case);
  older versions are deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOG = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
"""``renameat2`` arguments (linux/fcntl.h, linux/fs.h): paths relative to the working directory; swap the two."""


@contextlib.contextmanager
def exclusive_lock(path: Path, holder: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing, never deleted: deleting a lock file lets two
    processes lock two different files) for the ``with`` block. ``holder`` names the step in the log lines said
    while another process holds the lock and this one waits for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.info("%s: another process holds %s: waiting for it to finish", holder, path)
            started = time.monotonic()
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            LOG.info("%s: acquired %s after waiting %.1f s", holder, path, time.monotonic() - started)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def unique_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder ``parent/<prefix><random>`` that no other process got (``mkdir`` fails on a taken
    name), with the permissions the umask gives; ``parent`` is created if missing."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def remove(path: Path) -> None:
    """Delete ``path``: a symlink itself (not what it points to), a folder with its contents, or a file."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(staging: Path, final: Path) -> None:
    """Put the finished folder ``staging`` in place of ``final`` (a sibling): the old ``final`` is renamed aside,
    ``staging`` renamed to ``final``, and only then the old one deleted (restored if the second rename fails)."""
    staging, final = Path(staging), Path(final)
    aside = None
    if final.is_symlink() or final.exists():
        aside = final.with_name(f".{final.name}.old-{secrets.token_hex(6)}")
        os.rename(final, aside)
    try:
        os.rename(staging, final)
    except BaseException:
        if aside is not None:
            os.rename(aside, final)
        raise
    if aside is not None:
        remove(aside)


def _version_pattern(link: Path) -> re.Pattern[str]:
    return re.compile(re.escape(link.name) + r"\.\d{8}T\d{6}Z-[0-9a-f]{8}")


def _version_name(link: Path) -> str:
    return f"{link.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


def versions(link: Path) -> list[Path]:
    """The version folders of ``link`` that exist (sorted by name: by creation time)."""
    pattern = _version_pattern(link)
    return sorted(entry for entry in link.parent.iterdir()
                  if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink())


def current_version(link: Path) -> Path | None:
    """The folder ``link`` serves now: its symlink target, ``link`` itself where it is a plain folder (written
    before versions existed), None where there is none."""
    link = Path(link)
    if link.is_symlink():
        target = link.parent / os.readlink(link)
        return target if target.is_dir() else None
    return link if link.is_dir() else None


def _exchange(first: Path, second: Path) -> None:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``, Linux 3.15+); OSError where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in this C library")
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first), None, str(second))


def _switch(link: Path, version: Path) -> Path | None:
    """Point ``link`` at ``version`` (a sibling) in one rename; the folder it served before (None: none).

    A plain folder at ``link`` (written before versions existed) is swapped with the new link atomically where the
    kernel can, and kept as a version; otherwise it is renamed aside first (a moment without ``link``, once)."""
    previous = current_version(link)
    temporary = link.with_name(f".{link.name}.link-{secrets.token_hex(6)}")
    os.symlink(version.name, temporary)  # relative: the same on every pod that mounts the folder elsewhere
    try:
        if previous == link:  # a plain folder
            kept = link.with_name(_version_name(link))
            try:
                _exchange(temporary, link)  # now `link` is the symlink and `temporary` the old folder
                os.rename(temporary, kept)
            except OSError as error:
                LOG.warning("%s: cannot swap the folder for a link atomically (%s): renaming it aside", link, error)
                os.rename(link, kept)
                os.replace(temporary, link)
            return kept
        os.replace(temporary, link)
        return previous
    finally:
        if temporary.is_symlink():
            temporary.unlink()


def publish_version(staging: Path, link: Path, is_current: Callable[[Path], bool] | None = None) -> Path:
    """Serve the finished folder ``staging`` (a sibling of ``link``) as ``link``'s new version; the version served.

    Under ``.<link name>.lock``: if ``is_current(version now served)`` says that version already is what ``staging``
    holds, ``staging`` is deleted and nothing changes. Otherwise ``staging`` is renamed to a new version, ``link``
    switched to it, and every version but the new one and the one it replaced deleted."""
    staging, link = Path(staging), Path(link)
    with exclusive_lock(link.with_name(f".{link.name}.lock"), f"switching {link}"):
        served = current_version(link)
        if served is not None and is_current is not None and is_current(served):
            remove(staging)
            LOG.info("%s already serves this content (%s): kept", link, served.name)
            return served
        version = link.with_name(_version_name(link))
        os.rename(staging, version)
        previous = _switch(link, version)
        keep = {version.name} | ({previous.name} if previous is not None else set())
        for old in versions(link):
            if old.name not in keep:
                LOG.info("%s: deleting %s (neither the version served nor the one before it)", link, old.name)
                remove(old)
        LOG.info("%s -> %s%s", link, version.name, f" (was {previous.name})" if previous is not None else "")
        return version
