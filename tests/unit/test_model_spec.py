"""The model metadata contract: versioned, so exporters and gateways of different releases interoperate."""

from __future__ import annotations

import json

import pytest

from samserve import model_spec


def test_metadata_of_a_newer_exporter_is_read_unless_its_major_version_is_newer():
    meta = model_spec.ModelMetadata(
        model_id="m", variant="tiny", weights_sha256="0" * 64, image_size=256, embedding_shape=(8, 16, 16),
        low_res_mask_size=(64, 64), num_mask_tokens=4, mask_threshold=0.0, pixel_mean=(1.0, 2.0, 3.0),
        pixel_std=(4.0, 5.0, 6.0), preprocessing_version=1, exporter_version="x",
    )
    raw = json.loads(meta.to_json())
    assert raw["schema_version"] == model_spec.METADATA_SCHEMA_VERSION
    assert model_spec.ModelMetadata.from_json(json.dumps({**raw, "a_field_from_the_future": [1, 2]})) == meta
    del raw["schema_version"]  # written before the field existed
    assert model_spec.ModelMetadata.from_json(json.dumps(raw)) == meta
    with pytest.raises(ValueError, match="newer than this gateway"):
        newer = model_spec.METADATA_SCHEMA_VERSION + 1
        model_spec.ModelMetadata.from_json(json.dumps({**raw, "schema_version": newer}))


def test_metadata_round_trip_and_cache_namespace(tmp_path):
    meta = model_spec.ModelMetadata(
        model_id="m", variant="tiny", weights_sha256="ab" * 32, image_size=256, embedding_shape=(64, 16, 16),
        low_res_mask_size=(64, 64), num_mask_tokens=4, mask_threshold=0.0, pixel_mean=(1.0, 2.0, 3.0),
        pixel_std=(4.0, 5.0, 6.0), preprocessing_version=1, exporter_version="x",
    )
    meta.write(tmp_path)
    assert model_spec.ModelMetadata.read(tmp_path) == meta
    assert meta.cache_namespace == f"m:{'ab' * 32}:pp1"
