"""The ML backend's HTTP app (being written)."""

from __future__ import annotations

from samserve.labelstudio.settings import LabelStudioSettings


def serve(settings: LabelStudioSettings) -> int:
    raise SystemExit("samserve labelstudio: not ready yet")
