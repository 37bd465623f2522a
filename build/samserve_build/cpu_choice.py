"""``SAMSERVE_TARGET=auto``: the fastest CPU encoder and decoder on this machine, from its flags and a short
measured calibration.

A target of :data:`samserve_build.targets.CPU_TARGETS` is a candidate when this CPU has one of its
``native_flags`` (bf16 needs AVX-512-bf16 or AMX: emulated bf16 was 8x slower on an AVX2-only EPYC). Each candidate
loads both models as Triton would (:func:`samserve.backends.python_model.create_runner` with its rendered config's
parameters) and is timed on the exported model itself: the encoder on one image, the decoder on one 2-point prompt.
The encoder and the decoder are chosen separately (the encoder runs once per image, the decoder once per prompt, and
the fastest of each may come from different runtimes): the fastest of each wins, and a tie within :data:`MARGIN`
goes to the earlier candidate (fp32 before bf16, ONNX Runtime first). Different winners render as
:func:`samserve_build.targets.composed`.

The result is cached in the workdir (``cpu-choice.json``) per CPU model, flags, model and runtime versions, so the
calibration runs once per machine and model; every resolution logs what it chose and why.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from samserve.core import model_spec
from samserve_build.targets import CPU_TARGETS, SERVING_TARGETS, ServingTarget, ServingTargetName, composed
from samserve_build.timing import time_calls

LOG = logging.getLogger(__name__)
CACHE_FILE = "cpu-choice.json"
MARGIN = 0.05
"""A later candidate must be this much cheaper (relative) to displace an earlier one."""
ENCODER_RUNS, DECODER_RUNS = 1, 3
"""Timed runs per candidate, each after one untimed warm-up run (the median is kept)."""
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile", "fma")


@dataclasses.dataclass(frozen=True)
class Cpu:
    """This machine's CPU: what ``auto``'s choice depends on, and what every results file records (bench/common.py).
    Read from /proc/cpuinfo (x86: ``vendor_id``, ``cpu family``, ``model``, ``stepping``, ``model name``)."""

    model: str
    """The marketing name (``model name``), e.g. "AMD EPYC 9R14 96-Core Processor"."""
    flags: tuple[str, ...]
    """The flags of :data:`FLAGS_OF_INTEREST` it has."""
    cores: int
    vendor: str = "unknown"
    """``vendor_id``: GenuineIntel, AuthenticAMD."""
    family: int | None = None
    model_number: int | None = None
    """``model``: with the family, names the microarchitecture (AMD family 25 model 17: Zen 4)."""
    stepping: int | None = None

    @classmethod
    def detect(cls, cpuinfo: Path = Path("/proc/cpuinfo")) -> Cpu:
        fields: dict[str, str] = {}
        try:
            for line in cpuinfo.read_text().splitlines():
                if not line.strip():
                    break  # the first processor describes them all
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        except OSError:
            pass
        flags = set(fields.get("flags", "").split())

        def number(key: str) -> int | None:
            value = fields.get(key, "")
            return int(value) if value.isdigit() else None

        return cls(fields.get("model name", "unknown"), tuple(flag for flag in FLAGS_OF_INTEREST if flag in flags),
                   os.cpu_count() or 1, fields.get("vendor_id", "unknown"), number("cpu family"), number("model"),
                   number("stepping"))

    def record(self) -> dict[str, object]:
        """The CPU as results files record it."""
        return {"model": self.model, "vendor": self.vendor, "family": self.family, "model_number": self.model_number,
                "stepping": self.stepping, "cores": self.cores, "flags": list(self.flags)}


def candidates(cpu: Cpu) -> list[ServingTargetName]:
    """The CPU targets this CPU runs natively, in order of preference."""
    return [name for name in CPU_TARGETS
            if not SERVING_TARGETS[name].native_flags or set(SERVING_TARGETS[name].native_flags) & set(cpu.flags)]


@dataclasses.dataclass(frozen=True)
class Timing:
    encoder_ms: float
    decoder_ms: float


def runtime_parameters(target: ServingTargetName, model: str) -> dict[str, str]:
    """The config parameters ``model`` of ``target`` loads with (its template's, then the target's)."""
    from samserve_build import repository

    serving = SERVING_TARGETS[target]
    text = (repository.TEMPLATES / serving.template(model) / model).joinpath("config.pbtxt").read_text()
    parameters = {key: value.string_value for key, value in repository.parse_config(text).parameters.items()}
    return {**parameters, **serving.parameters.get(model, {})}


def measure(target: ServingTargetName, model_dir: Path) -> Timing:
    """Time ``target``'s runners on the exported model in ``model_dir`` (one image, one 2-point prompt)."""
    from samserve.backends import python_model
    from samserve_build import export

    meta = model_spec.ModelMetadata.read(model_dir)
    rng = np.random.default_rng(0)
    feeds = {model_spec.ENCODER_MODEL: export.encoder_inputs(meta, 1, rng),
             model_spec.DECODER_MODEL: export.decoder_inputs(meta, 1, 2, rng)}
    runs = {model_spec.ENCODER_MODEL: ENCODER_RUNS, model_spec.DECODER_MODEL: DECODER_RUNS}
    times = {}
    for model, model_file in SERVING_TARGETS[target].model_files.items():
        parameters = runtime_parameters(target, model)
        runner = python_model.create_runner(parameters.get("runtime", "onnxruntime"), model_dir / model_file, model,
                                              parameters, meta, 0)
        try:
            feed = feeds[model]
            times[model] = 1000 * float(np.median(time_calls(functools.partial(runner.run, feed), runs[model])))
        finally:
            runner.close()
    return Timing(times[model_spec.ENCODER_MODEL], times[model_spec.DECODER_MODEL])


@dataclasses.dataclass(frozen=True)
class Choice:
    encoder: ServingTargetName
    decoder: ServingTargetName

    @property
    def target(self) -> ServingTarget:
        return composed(self.encoder, self.decoder)


def _fastest(times: Mapping[ServingTargetName, float]) -> ServingTargetName:
    """The fastest; an earlier one keeps its place unless a later one is :data:`MARGIN` faster."""
    best = next(iter(times))
    for name, value in times.items():
        if value < (1 - MARGIN) * times[best]:
            best = name
    return best


def choose(timings: Mapping[ServingTargetName, Timing]) -> Choice:
    """The fastest encoder and the fastest decoder of the candidates (in order of preference)."""
    return Choice(_fastest({name: t.encoder_ms for name, t in timings.items()}),
                  _fastest({name: t.decoder_ms for name, t in timings.items()}))


def _versions() -> dict[str, str]:
    import onnxruntime
    import openvino

    return {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}


def _cache_key(cpu: Cpu, meta: model_spec.ModelMetadata, names: Sequence[ServingTargetName]) -> dict[str, object]:
    return {"cpu": cpu.model, "flags": list(cpu.flags), "cores": cpu.cores, "model_id": meta.model_id,
            "weights_sha256": meta.weights_sha256, "candidates": [str(name) for name in names], **_versions()}


def resolve(model_dir: Path, workdir: Path, cpu: Cpu | None = None) -> ServingTarget:
    """The target ``auto`` means on this machine for the model exported in ``model_dir`` (calibrated once, then
    read from ``workdir/cpu-choice.json``)."""
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
        choice = choose(timings)
        record = {"key": key, "encoder": str(choice.encoder), "decoder": str(choice.decoder), "skipped": skipped,
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "timings": {str(name): dataclasses.asdict(timing) for name, timing in timings.items()}}
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_suffix(".partial")
        staging.write_text(json.dumps([*[r for r in records if r["key"] != key], record], indent=2))
        staging.replace(cache)
    timings_of = record["timings"]
    LOG.info("auto: encoder as %s, decoder as %s on %s (%s); encoder ms: %s; decoder ms: %s", record["encoder"],
             record["decoder"], cpu.model, " ".join(cpu.flags) or "no flags of interest",
             ", ".join(f"{name} {t['encoder_ms']:.0f}" for name, t in timings_of.items()),
             ", ".join(f"{name} {t['decoder_ms']:.1f}" for name, t in timings_of.items()))
    return Choice(ServingTargetName(record["encoder"]), ServingTargetName(record["decoder"])).target
