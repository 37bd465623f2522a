"""The settings object: which model is served by default."""

from __future__ import annotations


def test_the_shipped_model_is_served_unless_another_is_configured(monkeypatch) -> None:
    from samserve.settings import SCENES_CHECKPOINT, Settings

    for name in ("SAMSERVE_MODEL_VARIANT", "SAMSERVE_CHECKPOINT"):
        monkeypatch.delenv(name, raising=False)
    default = Settings()
    assert (default.model_variant, default.checkpoint) == ("scenes", SCENES_CHECKPOINT)
    assert SCENES_CHECKPOINT.exists() and SCENES_CHECKPOINT.with_suffix(".json").exists()
    assert default.model_id == "scenes:samserve_scenes_v1"
    monkeypatch.setenv("SAMSERVE_MODEL_VARIANT", "vit_b")
    assert Settings().checkpoint is None                       # Meta's variant without a path: random weights
    monkeypatch.setenv("SAMSERVE_CHECKPOINT", "/models/sam_vit_b_01ec64.pth")
    assert Settings().model_id == "vit_b:sam_vit_b_01ec64"
