"""Chaos soak: two gateways sharing Redis, one Triton, a fixed-rate client load, faults on a schedule.

The load (see tools/samserve_dev/soak.py): interactive clicks by image_id on a working set of embedded images (NOT_FOUND
-> the bytes sent again), clicks with the image bytes, Embed, clicks on images never sent before; a round-robin
client over both gateways that retries UNAVAILABLE (the default service config), plus a probe without retries
that shows what the retries hid. Every answer is compared with the answer of a fault-free gateway. Faults, in
order, scaled to --duration-s: Redis SIGKILL + restart, Redis slow (CLIENT PAUSE), SIGTERM + restart of one gateway,
Triton SIGKILL + restart, a third gateway under a memory limit sent several ~60-megapixel images at once.
Writes soak_cpu.json (per phase: requests, failures by code, wrong answers, p50/p99, time to recover; targets
evaluated) and soak_cpu.png (timeline, fault phases shaded) to bench/results (or --out).
Targets: 0 wrong answers; 0 failed calls through the Redis faults and the rolling restart; only UNAVAILABLE during
the Triton restart and full service within 30 s of Triton ready; the memory-limited gateway stays up.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.common import WORK, add_output_argument, environment, print_table, shown_path, write_results
from samserve.core import model_spec, service_config
from samserve_dev import soak


def scenes_model(root: Path) -> Path:
    """The shipped model trained on generated scenes (meaningful masks), exported once."""
    from samserve_build import export
    from samserve_build.settings import SCENES_CHECKPOINT

    if not current_export(root):
        export.export_model("scenes", SCENES_CHECKPOINT, root)
    return root


def tiny_model(root: Path) -> Path:
    """The tiny architecture with seeded random weights (what the 60-second test serves)."""
    from samserve_build import export

    if not current_export(root):
        export.export_random_weights("tiny", 0, root)
    return root


def current_export(root: Path) -> bool:
    """Whether ``root`` holds an export of this exporter (an older one lacks files the targets now serve)."""
    from samserve_build import export

    metadata = root / model_spec.METADATA_FILE
    return metadata.exists() and export.written_by_this_exporter(model_spec.ModelMetadata.read(root))


MODELS: dict[str, Callable[[Path], Path]] = {"scenes": scenes_model, "tiny": tiny_model}

OUTCOME_COLORS = {"OK": "tab:green", "UNAVAILABLE": "tab:red", "DEADLINE_EXCEEDED": "magenta",
                  "RESOURCE_EXHAUSTED": "tab:olive"}


FAULT_STYLE = {"redis_sigkill": ("Redis SIGKILL", "tab:red"), "redis_slow": ("Redis slow", "tab:orange"),
               "gateway_rolling_restart": ("gateway restart", "tab:blue"),
               "triton_sigkill": ("Triton SIGKILL", "tab:purple"),
               "memory_limited_gateway": ("60-MP burst, limited gateway", "tab:brown")}


def plot(result: soak.SoakResult, path: Path) -> None:
    """Latency of every call over time (failures by code, wrong answers black), calls per second below; the
    fault phases shaded, one colour per fault."""
    figure, (latency, rate) = plt.subplots(2, 1, figsize=(12, 6.5), dpi=110, sharex=True,
                                           gridspec_kw={"height_ratios": [3, 1.3]})
    shaded: set[str] = set()
    fault_handles: list = []
    fault_labels: list[str] = []
    for phase in result.phases:
        if phase.fault is None:
            continue
        label, color = FAULT_STYLE.get(phase.fault, (phase.fault, "tab:gray"))
        for axis in (latency, rate):
            span = axis.axvspan(phase.start_s, max(phase.end_s, phase.start_s + 0.3), color=color, alpha=0.18)
        if phase.fault not in shaded:
            fault_handles.append(span)
            fault_labels.append(label)
        shaded.add(phase.fault)
    codes = sorted({c.code for c in result.calls}, key=lambda code: (code != "OK", code))
    for code in codes:
        calls = [c for c in result.calls if c.code == code and c.verdict != "wrong"]
        latency.scatter([c.start_s for c in calls], [max(c.end_s - c.start_s, 1e-4) * 1000 for c in calls], s=4,
                        color=OUTCOME_COLORS.get(code, "tab:red"), label=f"{code} ({len(calls)})",
                        marker="." if code == "OK" else "x")
    wrong = [c for c in result.calls if c.verdict == "wrong"]
    latency.scatter([c.start_s for c in wrong], [(c.end_s - c.start_s) * 1000 for c in wrong], s=20, color="black",
                    marker="D", label=f"wrong answer ({len(wrong)})")
    latency.set_yscale("log")
    latency.set_ylabel("latency (ms)")
    latency.legend(fontsize=7, loc="upper left", title="main load (retries on)", title_fontsize=7)
    latency.grid(True, which="both", alpha=0.3)
    end = max(phase.end_s for phase in result.phases)
    bins = np.arange(0, end + 1, 1.0)
    ok = [c.start_s for c in result.calls if c.ok]
    failed = [c.start_s for c in result.calls if not c.ok]
    probe_failed = [c.start_s for c in result.probe_calls if not c.ok]
    rate.hist([ok, failed], bins=bins, stacked=True, color=["tab:green", "tab:red"], label=["ok", "failed/wrong"])
    rate.hist(probe_failed, bins=bins, histtype="step", color="black", label="no-retry probe: failed")
    rate.set_ylabel("calls / s")
    rate.set_xlabel("seconds since the load started")
    rate.legend(fontsize=7, loc="lower left", ncol=3, framealpha=0.9)
    figure.legend(fault_handles, fault_labels, loc="lower center", ncol=len(fault_labels), fontsize=8,
                  title="fault phases", title_fontsize=8)
    figure.suptitle(f"samserve chaos soak on a CPU: {result.rate_per_s:g} calls/s over 2 gateways sharing Redis, "
                    "one Triton", fontsize=10)
    figure.tight_layout(rect=(0, 0.09, 1, 1))
    figure.savefig(path)
    plt.close(figure)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _failures(entry: dict) -> str:
    return ", ".join(f"{code} {n}" for code, n in entry["failures_by_code"].items()) or "-"


def print_summary(result: soak.SoakResult) -> None:
    probe_phases = result.probe_summary["phases"]
    rows = []
    for entry, probe in zip(result.summary["phases"], probe_phases, strict=True):
        rows.append([entry["name"], entry["cycle"], f"{entry['start_s']:.0f}-{entry['end_s']:.0f}",
                     entry["requests"], _failures(entry), entry["wrong_answers"], entry["resent_after_not_found"],
                     _ms(entry["p50_ms"]), _ms(entry["p99_ms"]),
                     "-" if entry.get("recovery_s") is None else f"{entry['recovery_s']:.2f}",
                     entry.get("ok_started_during_outage", "-"), sum(probe["failures_by_code"].values())])
    print_table("chaos soak, per phase (main load with retries; last column: failures of the no-retry probe)",
                ["phase", "#", "s", "requests", "failures", "wrong", "resent", "p50 ms", "p99 ms", "recover s",
                 "ok in outage", "probe fail"], rows)
    rows = []
    for fault, entry in result.summary["by_fault"].items():
        probe = result.probe_summary["by_fault"][fault]
        rows.append([fault, entry["runs"], entry["requests"], _failures(entry), entry["wrong_answers"],
                     _ms(entry["p50_ms"]), _ms(entry["p99_ms"]),
                     "-" if entry["worst_recovery_s"] is None else f"{entry['worst_recovery_s']:.2f}",
                     entry["ok_started_during_outage"], _failures(probe)])
    print_table("per fault (its phases and the quiet time after them)",
                ["fault", "runs", "requests", "failures", "wrong", "p50 ms", "p99 ms", "worst recover s",
                 "ok in outage", "probe failures"], rows)
    print()
    for name, target in result.targets.items():
        print(f"{'MET ' if target['met'] else 'MISS'} {name}: {target['measured']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=240.0, help="length of the run (faults scale with it)")
    parser.add_argument("--rate", type=float, default=8.0, help="calls per second of the main load")
    parser.add_argument("--model", choices=sorted(MODELS), default="scenes")
    parser.add_argument("--big-images", type=int, default=4, help="~60-megapixel images sent at once")
    parser.add_argument("--memory-limit-mib", type=int, default=1536,
                        help="of the memory-limited gateway (measured: its 4 images at once peak at about 1.0 GB)")
    add_output_argument(parser)
    args = parser.parse_args()
    started = time.monotonic()
    model_dir = MODELS[args.model](WORK / "soak" / f"{args.model}-model")
    meta = model_spec.ModelMetadata.read(model_dir)
    result = soak.run_soak(model_dir, WORK / "soak" / "run", args.duration_s, args.rate, args.big_images,
                           args.memory_limit_mib << 20)
    print_summary(result)
    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "soak_cpu.png"
    plot(result, plot_path)
    write_results("soak_cpu.json", {
        "benchmark": "bench/soak.py",
        "environment": environment(),
        "model": {"variant": args.model, "model_id": meta.model_id, "image_size": meta.image_size},
        "duration_s": args.duration_s,
        "run_s": max(phase.end_s for phase in result.phases),
        "wall_s_with_setup": time.monotonic() - started,
        "rate_per_s": args.rate,
        "setup": result.setup,
        "comparison": {"exact": "RLE bytes and scores equal", "close": f"every mask IoU >= {soak.CLOSE_IOU}, "
                       f"scores within {soak.CLOSE_SCORE}", "wrong": "anything else (counts against the target)"},
        "recovery": f"seconds from the fault's end (Triton: from ready) to the end of the first of "
                    f"{soak.RECOVERY_STREAK} consecutive successful calls",
        "ok_started_during_outage": f"calls started over {soak.OUTAGE_MARGIN_S} s before the recovery point and "
                                    "answered OK (for Triton: answered thanks to the client's retries)",
        "client_retry_policy": json.loads(service_config.service_config()),
        "by_fault": result.summary["by_fault"],
        "phases": result.summary["phases"],
        "no_retry_probe": {"description": "segment_by_id through a client with retry_attempts=1 on the same gateways",
                           **result.probe_summary},
        "targets": result.targets,
        "targets_met": {name: target["met"] for name, target in result.targets.items()},
        "plot": shown_path(plot_path),
    }, args.out)


if __name__ == "__main__":
    main()
