"""``SAMSERVE_TARGET=auto``: the fastest CPU target on this machine, from its flags and a short measured calibration.

A target of :data:`samserve_build.targets.CPU_TARGETS` is a candidate when this CPU has one of its
``native_flags`` (bf16 needs AVX-512-bf16 or AMX: emulated bf16 was 8x slower on an AVX2-only EPYC). Each candidate
loads both models as Triton would (:func:`samserve.triton_backend.create_runner` with its rendered config's
parameters) and is timed on the exported model itself: the encoder on one image, the decoder on one 2-point prompt.
Its cost is one embedding plus :data:`PROMPTS_PER_IMAGE` decoder runs; the cheapest wins, and a tie within
:data:`MARGIN` goes to the earlier candidate (fp32 before bf16, ONNX Runtime first).

The result is cached in the workdir (``cpu-choice.json``) per CPU model, flags, model and runtime versions, so the
calibration runs once per machine and model; every resolution logs what it chose and why.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from samserve import model_spec
from samserve_build.targets import CPU_TARGETS, SERVING_TARGETS, ServingTargetName

LOG = logging.getLogger(__name__)
CACHE_FILE = "cpu-choice.json"
PROMPTS_PER_IMAGE = 16
"""Decoder runs weighed against one embedding: an interactive session's clicks on one image."""
MARGIN = 0.05
"""A later candidate must be this much cheaper (relative) to displace an earlier one."""
ENCODER_RUNS, DECODER_RUNS = 1, 3
"""Timed runs per candidate, each after one untimed warm-up run (the median is kept)."""
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile", "fma")


@dataclasses.dataclass(frozen=True)
class Cpu:
    """This machine's CPU as the choice depends on it."""

    model: str
    flags: tuple[str, ...]
    """The flags of :data:`FLAGS_OF_INTEREST` it has."""
    cores: int

    @classmethod
    def detect(cls, cpuinfo: Path = Path("/proc/cpuinfo")) -> Cpu:
        model, flags = "unknown", set()
        try:
            for line in cpuinfo.read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
        except OSError:
            pass
        return cls(model, tuple(flag for flag in FLAGS_OF_INTEREST if flag in flags), os.cpu_count() or 1)


def candidates(cpu: Cpu) -> list[ServingTargetName]:
    """The CPU targets this CPU runs natively, in order of preference."""
    return [name for name in CPU_TARGETS
            if not SERVING_TARGETS[name].native_flags or set(SERVING_TARGETS[name].native_flags) & set(cpu.flags)]


@dataclasses.dataclass(frozen=True)
class Timing:
    encoder_ms: float
    decoder_ms: float

    @property
    def cost_ms(self) -> float:
        """One embedding and :data:`PROMPTS_PER_IMAGE` decoder runs."""
        return self.encoder_ms + PROMPTS_PER_IMAGE * self.decoder_ms


def runtime_parameters(target: ServingTargetName, model: str) -> dict[str, str]:
    """The config parameters ``model`` of ``target`` loads with (its template's, then the target's)."""
    from samserve_build import repository

    serving = SERVING_TARGETS[target]
    text = (repository.TEMPLATES / serving.templates / model).joinpath("config.pbtxt").read_text()
    parameters = {key: value.string_value for key, value in repository.parse_config(text).parameters.items()}
    return {**parameters, **serving.parameters.get(model, {})}


def _median_ms(run: Callable[[Mapping[str, np.ndarray]], object], feeds: Mapping[str, np.ndarray], runs: int) -> float:
    run(feeds)  # warm-up: compilation caches, memory arenas
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feeds)
        samples.append((time.perf_counter() - start) * 1000)
    return float(np.median(samples))


def measure(target: ServingTargetName, model_dir: Path) -> Timing:
    """Time ``target``'s runners on the exported model in ``model_dir`` (one image, one 2-point prompt)."""
    from samserve import triton_backend
    from samserve_build import export

    meta = model_spec.ModelMetadata.read(model_dir)
    rng = np.random.default_rng(0)
    feeds = {model_spec.ENCODER_MODEL: export.encoder_inputs(meta, 1, rng),
             model_spec.DECODER_MODEL: export.decoder_inputs(meta, 1, 2, rng)}
    runs = {model_spec.ENCODER_MODEL: ENCODER_RUNS, model_spec.DECODER_MODEL: DECODER_RUNS}
    times = {}
    for model, model_file in SERVING_TARGETS[target].model_files.items():
        parameters = runtime_parameters(target, model)
        runner = triton_backend.create_runner(parameters.get("runtime", "onnxruntime"), model_dir / model_file, model,
                                              parameters, meta, 0)
        try:
            times[model] = _median_ms(runner.run, feeds[model], runs[model])
        finally:
            runner.close()
    return Timing(times[model_spec.ENCODER_MODEL], times[model_spec.DECODER_MODEL])


def choose(timings: Mapping[ServingTargetName, Timing]) -> ServingTargetName:
    """The cheapest candidate; an earlier one keeps its place unless a later one is :data:`MARGIN` cheaper."""
    best = next(iter(timings))
    for name, timing in timings.items():
        if timing.cost_ms < (1 - MARGIN) * timings[best].cost_ms:
            best = name
    return best


def _versions() -> dict[str, str]:
    import onnxruntime
    import openvino

    return {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}


def _cache_key(cpu: Cpu, meta: model_spec.ModelMetadata, names: Sequence[ServingTargetName]) -> dict[str, object]:
    return {"cpu": cpu.model, "flags": list(cpu.flags), "cores": cpu.cores, "model_id": meta.model_id,
            "weights_sha256": meta.weights_sha256, "candidates": [str(name) for name in names],
            "prompts_per_image": PROMPTS_PER_IMAGE, **_versions()}


def resolve(model_dir: Path, workdir: Path, cpu: Cpu | None = None) -> ServingTargetName:
    """The CPU target ``auto`` means on this machine for the model exported in ``model_dir`` (calibrated once,
    then read from ``workdir/cpu-choice.json``)."""
    cpu = cpu or Cpu.detect()
    meta = model_spec.ModelMetadata.read(model_dir)
    names = candidates(cpu)
    key = _cache_key(cpu, meta, names)
    cache = Path(workdir) / CACHE_FILE
    records = json.loads(cache.read_text()) if cache.exists() else []
    record = next((r for r in records if r["key"] == key), None)
    if record is None:
        skipped = [str(name) for name in CPU_TARGETS if name not in names]
        LOG.info("auto: calibrating %s on %s (%d cores, flags %s)%s", ", ".join(map(str, names)), cpu.model,
                 cpu.cores, " ".join(cpu.flags) or "none",
                 f"; skipping {', '.join(skipped)}: no native bf16 (AVX-512-bf16 or AMX)" if skipped else "")
        timings: dict[ServingTargetName, Timing] = {}
        for name in names:
            try:
                timings[name] = measure(name, model_dir)
            except Exception as error:  # noqa: BLE001 - a runtime that cannot load here is no candidate
                LOG.warning("auto: %s does not run here: %s", name, error)
                continue
            LOG.info("auto: %s encoder %.0f ms, decoder %.1f ms", name, timings[name].encoder_ms,
                     timings[name].decoder_ms)
        if not timings:
            raise RuntimeError("auto: no CPU target runs on this machine")
        chosen = choose(timings)
        record = {"key": key, "chosen": str(chosen), "skipped": skipped,
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "timings": {str(name): dataclasses.asdict(timing) for name, timing in timings.items()}}
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_suffix(".partial")
        staging.write_text(json.dumps([*[r for r in records if r["key"] != key], record], indent=2))
        staging.replace(cache)
    LOG.info("auto: %s on %s (%s); cost of one embedding + %d decoder runs: %s", record["chosen"], cpu.model,
             " ".join(cpu.flags) or "no flags of interest", PROMPTS_PER_IMAGE,
             ", ".join(f"{name} {t['encoder_ms'] + PROMPTS_PER_IMAGE * t['decoder_ms']:.0f} ms"
                       for name, t in record["timings"].items()))
    return ServingTargetName(record["chosen"])
