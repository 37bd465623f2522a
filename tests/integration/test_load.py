"""Locust smoke: the committed locustfile, headless for ~10 s against a real stack; zero failures."""

from __future__ import annotations

import pytest

from samserve_dev.locust import run_headless

EXPECTED_CALL = {"MixedUser": "Segment hot (image_id)", "EverythingUser": "GenerateMasks (image_id)"}


@pytest.mark.parametrize("scenario", sorted(EXPECTED_CALL))
def test_locust_headless_has_no_failures(gateway, tmp_path, scenario):
    rows = run_headless(gateway.target, tmp_path, scenario)
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0 and int(total["Failure Count"]) == 0
    assert int(rows[EXPECTED_CALL[scenario]]["Request Count"]) > 0
