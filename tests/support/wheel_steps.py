"""The packaging commands that tests/integration/test_wheel.py runs and the images' RUN steps repeat
(deploy/docker/*.Dockerfile; tests/deploy/test_images.py checks each RUN against these)."""

from __future__ import annotations

BUILD_WHEEL = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check", "-q"]
"""``python BUILD_WHEEL -w DIST SOURCE``: the wheel, without build isolation (the build requirements installed)."""

MAKE_VENV = ["-m", "venv"]
"""``python MAKE_VENV DIR``: the fresh environment the wheel goes into."""

INSTALL_WHEEL = ["-m", "pip", "install", "--disable-pip-version-check", "-q"]
"""``VENV/bin/python INSTALL_WHEEL WHEEL``: the wheel with its dependencies from the registry."""
