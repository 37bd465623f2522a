"""samserve_build.cpu_choice: which CPU targets are candidates, how the fastest encoder and decoder are chosen and
rendered, the cached calibration (the measuring itself runs in tests/integration/test_cpu_runtimes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from samserve.core import model_spec
from samserve_build import cpu_choice
from samserve_build.targets import CPU_TARGETS, SERVING_TARGETS, ServingTargetName

ORT, OV, BF16 = CPU_TARGETS


def cpu(*flags: str) -> cpu_choice.Cpu:
    return cpu_choice.Cpu("Test CPU", flags, 2)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Test\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    detected = cpu_choice.Cpu.detect(cpuinfo)
    assert detected.model == "Intel(R) Xeon(R) Test" and detected.flags == ("avx2", "amx_bf16", "amx_tile")
    assert cpu_choice.Cpu.detect(tmp_path / "missing").model == "unknown"


@pytest.mark.parametrize(("flags", "expected"), [
    ((), [ORT, OV]),                          # no native bf16: emulated bf16 is no candidate
    (("avx2", "avx512f"), [ORT, OV]),
    (("avx512_bf16",), [ORT, OV, BF16]),
    (("amx_bf16", "amx_tile"), [ORT, OV, BF16]),
])
def test_bf16_is_a_candidate_only_with_native_bf16(flags: tuple[str, ...], expected: list[ServingTargetName]) -> None:
    assert cpu_choice.candidates(cpu(*flags)) == expected


def timing(encoder_ms: float, decoder_ms: float) -> cpu_choice.Timing:
    return cpu_choice.Timing(encoder_ms, decoder_ms)


def test_encoder_and_decoder_are_chosen_apart_and_a_near_tie_keeps_the_earlier() -> None:
    choice = cpu_choice.choose({ORT: timing(6500, 40), OV: timing(5800, 49), BF16: timing(3300, 49)})
    assert (choice.encoder, choice.decoder) == (BF16, ORT)
    assert cpu_choice.choose({ORT: timing(1000, 10), OV: timing(990, 9.9)}) == cpu_choice.Choice(ORT, ORT)  # MARGIN
    assert cpu_choice.choose({ORT: timing(1000, 10), OV: timing(900, 9)}) == cpu_choice.Choice(OV, OV)
    assert cpu_choice.choose({OV: timing(1000, 10)}) == cpu_choice.Choice(OV, OV)


def test_a_choice_of_two_targets_renders_each_model_as_its_own(tmp_path: Path) -> None:
    one = cpu_choice.Choice(BF16, BF16).target
    assert one is SERVING_TARGETS[BF16] and one.label == "cpu-openvino-bf16"
    mixed = cpu_choice.Choice(BF16, ORT).target
    encoder, decoder = model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL
    assert mixed.template(encoder) == "cpu-openvino" and mixed.template(decoder) == "cpu-onnxruntime"
    assert mixed.parameters == {encoder: {model_spec.PRECISION_PARAMETER: "bf16"}}
    assert mixed.extra_files == {decoder: (model_spec.DECODER_NO_MASK_FILE,)}
    assert mixed.label == f"{encoder} as cpu-openvino-bf16, {decoder} as cpu-onnxruntime"


def test_the_calibration_is_cached_per_cpu_and_model(tiny_export: Path, tmp_path: Path, monkeypatch) -> None:
    measured: list[ServingTargetName] = []

    def measure(target: ServingTargetName, model_dir: Path) -> cpu_choice.Timing:
        measured.append(target)
        return {ORT: timing(100, 5), OV: timing(90, 6), BF16: timing(40, 6)}[target]

    monkeypatch.setattr(cpu_choice, "measure", measure)
    native = cpu("avx512_bf16")
    chosen = cpu_choice.resolve(tiny_export, tmp_path, native)
    assert chosen.components == {model_spec.ENCODER_MODEL: BF16, model_spec.DECODER_MODEL: ORT}
    assert measured == [ORT, OV, BF16]
    assert cpu_choice.resolve(tiny_export, tmp_path, native) == chosen and len(measured) == 3   # from the cache
    other = cpu_choice.resolve(tiny_export, tmp_path, cpu("avx2"))   # another CPU: calibrated anew
    assert other.components == {model_spec.ENCODER_MODEL: OV, model_spec.DECODER_MODEL: ORT} and len(measured) == 5
    assert (tmp_path / cpu_choice.CACHE_FILE).exists()


def test_a_runtime_that_fails_is_no_candidate(tiny_export: Path, tmp_path: Path, monkeypatch) -> None:
    def measure(target: ServingTargetName, model_dir: Path) -> cpu_choice.Timing:
        if target is not ORT:
            raise RuntimeError("no such plugin")
        return timing(100, 5)

    monkeypatch.setattr(cpu_choice, "measure", measure)
    assert cpu_choice.resolve(tiny_export, tmp_path, cpu("amx_bf16")) is SERVING_TARGETS[ORT]


@pytest.fixture
def tiny_export(tmp_path: Path) -> Path:
    """An export folder's metadata (all that resolve reads besides the measurements)."""
    folder = tmp_path / "model"
    folder.mkdir()
    model_spec.ModelMetadata(
        model_id="tiny-test", variant="tiny", weights_sha256="0" * 64, image_size=64, embedding_shape=(32, 4, 4),
        low_res_mask_size=(16, 16), num_mask_tokens=4, mask_threshold=0.0, pixel_mean=(1.0, 2.0, 3.0),
        pixel_std=(1.0, 1.0, 1.0), preprocessing_version=model_spec.PREPROCESSING_VERSION,
        exporter_version="test").write(folder)
    return folder
