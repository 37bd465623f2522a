"""samserve_build.workdir: the lock that serializes preparers sharing a folder, and the versioned repository switch
that never leaves readers without a whole repository nor deletes the files of the version they read."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

import pytest

from samserve_build import workdir
from samserve_dev.polling import wait_until


def _staged(parent: Path, text: str) -> Path:
    """A finished repository-like folder: model/1/model.txt and model/config.txt hold ``text``."""
    staging = workdir.unique_dir(parent, ".repo.staging-")
    (staging / "model" / "1").mkdir(parents=True)
    (staging / "model" / "1" / "model.txt").write_text(text)
    (staging / "model" / "config.txt").write_text(text)
    return staging


def test_a_second_holder_logs_that_it_waits_and_enters_only_after_release(tmp_path, caplog):
    lock = tmp_path / "shared" / ".prepare.lock"
    entered = threading.Event()

    def second() -> None:
        with workdir.exclusive_lock(lock, "second prepare"):  # its own open file: flock conflicts with ours
            entered.set()

    caplog.set_level(logging.INFO, logger=workdir.LOG.name)
    with workdir.exclusive_lock(lock, "first prepare"):
        thread = threading.Thread(target=second)
        thread.start()
        wait_until(lambda: [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()], bool,
                   "the second holder saying it waits", timeout_s=30)
        assert not entered.is_set()
    thread.join(timeout=30)
    assert entered.is_set()
    assert any("second prepare: acquired" in r.getMessage() for r in caplog.records)
    assert lock.exists()  # never deleted: a new file would let two processes lock two different files


def test_the_lock_is_released_when_its_block_raises(tmp_path):
    lock = tmp_path / ".prepare.lock"
    with pytest.raises(RuntimeError), workdir.exclusive_lock(lock, "failing"):
        raise RuntimeError("export failed")
    descriptor = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if it were still held
    finally:
        os.close(descriptor)


def test_unique_dirs_differ_and_follow_the_umask(tmp_path):
    first, second = workdir.unique_dir(tmp_path / "a", ".x-"), workdir.unique_dir(tmp_path / "a", ".x-")
    assert first != second and first.is_dir() and second.is_dir()
    umask = os.umask(0o022)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700: Triton may run as another user


def test_switching_keeps_an_open_file_of_the_old_version_readable_and_its_path_in_place(tmp_path):
    link = tmp_path / "repo"
    first = workdir.publish_version(_staged(tmp_path, "v1"), link)
    assert link.is_symlink() and os.readlink(link) == first.name  # relative: any mount point works
    assert (link / "model" / "1" / "model.txt").read_text() == "v1"
    reader = open(link / "model" / "1" / "model.txt")  # noqa: SIM115 - held open across the switch on purpose
    try:
        second = workdir.publish_version(_staged(tmp_path, "v2"), link)
        assert (link / "model" / "1" / "model.txt").read_text() == "v2"
        assert reader.read() == "v1"
        assert (first / "model" / "1" / "model.txt").read_text() == "v1"  # the previous version is kept
        third = workdir.publish_version(_staged(tmp_path, "v3"), link)
    finally:
        reader.close()
    assert not first.exists()  # older than the previous one: deleted
    assert second.exists() and third.exists()
    assert workdir.versions(link) == sorted([second, third])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".repo.")] == [".repo.lock"]  # no staging left


def test_an_equal_render_keeps_the_version_served(tmp_path):
    link = tmp_path / "repo"
    first = workdir.publish_version(_staged(tmp_path, "v1"), link)
    staging = _staged(tmp_path, "v1")
    kept = workdir.publish_version(
        staging, link, is_current=lambda served: (served / "model" / "config.txt").read_text() == "v1")
    assert kept == first and os.readlink(link) == first.name
    assert not staging.exists() and workdir.versions(link) == [first]


def test_every_step_of_a_switch_leaves_a_whole_repository_and_the_version_served_before(tmp_path, monkeypatch):
    """After each file-system change that publishing makes (renames, the link, deleting old versions) a reader
    finds a whole repository at the link, old or new, and the files of the version served before are in place."""
    link = tmp_path / "repo"
    for text in ("v0", "v1", "v2"):  # v0 is deleted by the third publish already; v1 by the next one
        workdir.publish_version(_staged(tmp_path, text), link)
    before = workdir.current_version(link)
    assert before is not None
    staging = _staged(tmp_path, "v3")
    steps: list[str] = []
    problems: list[str] = []  # recorded, not raised: shutil.rmtree(ignore_errors=True) would swallow an exception

    def check(step: str) -> None:
        try:
            model = (link / "model" / "1" / "model.txt").read_text()
            config = (link / "model" / "config.txt").read_text()
            if model not in {"v2", "v3"} or config != model:
                problems.append(f"after {step}: half a repository at the link ({model!r}, {config!r})")
            if (before / "model" / "1" / "model.txt").read_text() != "v2":
                problems.append(f"after {step}: the version served before changed")
        except OSError as error:
            problems.append(f"after {step}: {error}")

    def observe(name: str) -> None:
        real = getattr(os, name)

        def observed(*args: object, **kwargs: object) -> object:
            result = real(*args, **kwargs)
            steps.append(name)
            check(f"os.{name}{args}")
            return result

        monkeypatch.setattr(os, name, observed)

    for name in ("rename", "replace", "symlink", "unlink", "rmdir"):
        observe(name)
    workdir.publish_version(staging, link)
    monkeypatch.undo()
    assert not problems, problems
    assert {"rename", "replace", "rmdir"} <= set(steps)  # moved into place, switched, v1 deleted: all observed
    assert (link / "model" / "1" / "model.txt").read_text() == "v3"
    assert [version.name for version in workdir.versions(link)] == sorted([before.name, os.readlink(link)])


def test_a_repository_written_before_versions_becomes_the_previous_version(tmp_path):
    link = tmp_path / "repo"
    (link / "model").mkdir(parents=True)
    (link / "model" / "config.txt").write_text("legacy")
    new = workdir.publish_version(_staged(tmp_path, "v1"), link)
    assert link.is_symlink() and (link / "model" / "config.txt").read_text() == "v1"
    (legacy,) = [version for version in workdir.versions(link) if version != new]
    assert (legacy / "model" / "config.txt").read_text() == "legacy"
    assert not [p for p in tmp_path.iterdir() if ".link-" in p.name]


def test_replace_dir_puts_the_new_folder_in_place_and_deletes_the_old(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = workdir.unique_dir(tmp_path, ".model.staging-")
    (staging / "new.txt").write_text("new")
    workdir.replace_dir(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
