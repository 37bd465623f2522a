"""The unit tier: pure functions, fast, importing neither torch nor Triton (its client or its server).
Comparisons with the official PyTorch code live in tests/reference; tests needing real servers in tests/integration.

A run of this tier alone (``make test-unit``) fails when any of those modules got imported, naming the test module
or test that imported it first, so the property cannot silently regress."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FORBIDDEN = ("torch", "torchvision", "segment_anything", "tritonclient", "pytriton", "tritonserver")

_imported_by: dict[str, str] = {}  # forbidden top-level module -> the node whose collection or run imported it
_violations: list[str] = []


def _note(where: str) -> None:
    for name in {module.partition(".")[0] for module in list(sys.modules)} & set(FORBIDDEN):
        _imported_by.setdefault(name, where)


def pytest_configure(config: pytest.Config) -> None:
    _note("pytest's start-up (a plugin or the root conftest)")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note(report.nodeid or "collection")


def pytest_runtest_logfinish(nodeid: str) -> None:
    _note(nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    items = getattr(session, "items", [])
    if not items or not all(item.path.is_relative_to(HERE) for item in items):
        return  # other tiers ran in this process too: they import torch and Triton by design
    _note("the end of the session")
    _violations[:] = [f"{name} (first seen after {where})" for name, where in sorted(_imported_by.items())]
    if _violations and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _violations:
        terminalreporter.section("unit tier imported torch or Triton", red=True)
        for line in _violations:
            terminalreporter.write_line(f"FAILED import check: {line}", red=True)
