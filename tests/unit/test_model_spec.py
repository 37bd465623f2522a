"""The model metadata contract: versioned, so exporters and gateways of different releases interoperate."""

from __future__ import annotations

import dataclasses
import json

import pytest

from samserve.core import model_spec


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


def test_precision_keeps_embeddings_apart_and_an_unknown_one_is_refused():
    meta = model_spec.ModelMetadata(
        model_id="m", variant="tiny", weights_sha256="ab" * 32, image_size=256, embedding_shape=(64, 16, 16),
        low_res_mask_size=(64, 64), num_mask_tokens=4, mask_threshold=0.0, pixel_mean=(1.0, 2.0, 3.0),
        pixel_std=(4.0, 5.0, 6.0), preprocessing_version=1, exporter_version="x",
    )
    assert meta.precision == "fp32" and meta.unservable_reason() is None
    assert meta.cache_namespace == f"m:{'ab' * 32}:pp1"  # fp32 keys as before the field existed
    bf16 = dataclasses.replace(meta, precision="bf16")
    assert bf16.cache_namespace != meta.cache_namespace and bf16.cache_namespace.endswith(":bf16")
    assert model_spec.ModelMetadata.from_json(bf16.to_json()) == bf16
    reason = dataclasses.replace(meta, precision="fp8").unservable_reason()
    assert reason is not None and "'fp8'" in reason and "upgrade the gateway" in reason


def test_engine_records_round_trip_under_their_compute_capability():
    record = model_spec.EngineRecord(plan="model_cc90.plan", compute_capability="9.0",
                                     gpu_name="NVIDIA H100 80GB HBM3", tensorrt_version="10.7.0")
    assert model_spec.EngineRecord.from_json(record.to_json()) == record
    assert record.parameter == "samserve_engine_cc90"
    with pytest.raises(KeyError):
        model_spec.EngineRecord.from_json(json.dumps({"plan": "x"}))
