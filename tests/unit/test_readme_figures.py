"""Every measured figure the README and docs/ quote is read from bench/results (the JSON is the source; the docs
copy it).

A passage that quotes measured figures is marked in its page, invisibly in the rendered markdown:

    <!-- figures: NAME -->
    ... the figures ...
    <!-- /figures -->

NAME is a key of :data:`FIGURES`, whose function reads the results file(s) and returns each figure as the page must
render it, keyed by a label: the one line of the block that contains the label must contain the rendered values, in
order. Every other number in a block fails the test unless it is one of the block's :data:`CONSTANTS` (targets or
settings no results file holds, each with its reason). Numbers in `code spans`, link targets, dates and commit
hashes are not figures; nor are the digits of names such as fp32, p99, AVX-512 or avx512_bf16.

A figure that no results file holds is not quoted: either a benchmark records it, or the page says it was not kept.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

Figures = dict[str, list[str]]
"""label -> the rendered values the line holding that label must contain, in order."""


def results(name: str) -> dict[str, Any]:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


# ---------------------------------------------------------------------------------------------------------------
# Rendering helpers


def cores(data: dict[str, Any]) -> str:
    """The machine a results file was measured on, as the pages name it: "2-core AMD EPYC"."""
    cpu = data["environment"]["cpu"]
    return f"{cpu['cores']}-core {cpu['model']}"


def met(flag: bool) -> str:
    return "met" if flag else "**not met**"


def sci(value: float) -> str:
    """1 significant decimal, exponent without padding: 2.3e-6."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def power_of_ten(value: float) -> str:
    """The decade of a value: 0.0146 -> 1e-2, 0.0001 -> 1e-4."""
    return f"1e{math.floor(math.log10(value))}"


def quoted(text: str, pattern: str) -> str:
    """A figure that a results file states in words (a target's text): the pattern's group."""
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return found.group(1)


def timed_calls(samples: dict[str, int]) -> str:
    """amg_cpu's timed calls per side: the most common count, and each case that has another
    ("3 timed calls per side (1 for `scenes/defaults`, 2 for `vit_b/no_filter`)")."""
    usual = max(sorted(set(samples.values())), key=list(samples.values()).count)
    others = ", ".join(f"{count} for `{case}`" for case, count in samples.items() if count != usual)
    return f"{usual} timed calls per side" + (f" ({others})" if others else "")


def ms(record: dict[str, Any], digits: int) -> str:
    return f"{record['median_ms']:.{digits}f} ms"


# ---------------------------------------------------------------------------------------------------------------
# The figures of each block, read from bench/results


def models_figures() -> Figures:
    """docs/benchmarks.md: the Triton models vs the official predictor (models_cpu.json)."""
    data = results("models_cpu.json")
    r, ratios, targets = data["results"], data["ratios"], data["targets"]
    return {
        "| encoder (": [f"| {ms(r['official_set_image'], 0)} | {ms(r['triton_encoder'], 0)} | {ratios['encoder']:.2f} "
                        f"| ≤ {targets['encoder']:g} |"],
        "| decoder (": [f"| {ms(r['official_predict'], 1)} | {ms(r['triton_decoder_plus_postprocessing'], 1)} | "
                        f"{ratios['decoder_path']:.2f} | ≤ {targets['decoder_path']:g} |"],
    }


GATEWAY_ROWS = {"official_set_image": "| official `set_image` |", "cold_embed_rpc": "| cold Embed RPC |",
                "official_predict": "| official `predict` (", "hot_segment_rpc": "| hot Segment RPC by",
                "bare_triton_decoder": "| bare Triton decoder call ("}


def gateway_figures() -> Figures:
    """docs/benchmarks.md: Embed and Segment RPCs vs the official predictor and the bare decoder (gateway_cpu.json)."""
    data = results("gateway_cpu.json")
    r, figures, targets, done = data["results"], data["figures"], data["targets"], data["targets_met"]
    rows: Figures = {}
    for key, label in GATEWAY_ROWS.items():
        digits = 0 if key in ("official_set_image", "cold_embed_rpc") else 1
        rows[label] = [" | ".join(f"{r[key][p]:.{digits}f} ms" for p in ("median_ms", "p90_ms", "p99_ms")) + " |"]
    hot, hot_target = figures["hot_over_official_predict"], targets["hot_over_official_predict"]
    verdict = "met" if done["hot_over_official_predict"] else f"**not met**, by {hot - hot_target:.2f}"
    rows["Hot Segment / official predict"] = [f"= {hot:.2f} (target ≤ {hot_target:g}: {verdict})"]
    rows["cold / hot"] = [f"= {figures['cold_over_hot']:.0f} (≥ {targets['cold_over_hot']:g})"]
    overhead, overhead_target = figures["gateway_overhead_ms"], targets["gateway_overhead_ms"]
    rows["gateway overhead ("] = [f"= {overhead:.1f} ms (target ≤ {overhead_target:g} ms here",
                                  f"in the CPU-speed issue: {met(done['gateway_overhead_ms'])}"]
    rows["over HTTP/JSON"] = [f"took {figures['http_over_grpc_ms']:.2f} ms more than over gRPC"]
    return rows


CPU_SPEED_ISSUE_SPEEDUP = 6.0
"""The CPU-speed issue's segment-everything speedup target (amg_cpu.json records only its own, 3)."""


def amg_figures() -> Figures:
    """docs/benchmarks.md: segment everything vs the official generator, its set-up and a row per case
    (amg_cpu.json); 0 masks on both sides reads "not applicable", never a parity score."""
    data = results("amg_cpu.json")
    method, models, cases, targets = data["method"], data["models"], data["cases"], data["targets"]
    scene, synthetic = models["scenes"]["image"], models["vit_b"]["image"]
    threads = {model["official_torch_threads"] for model in models.values()}
    card, no_filter = cases["scenes/card"]["parameters"], cases["vit_b/no_filter"]["parameters"]
    iou, stability = no_filter["pred_iou_thresh"], no_filter["stability_score_thresh"]
    thresholds = (f"`pred_iou_thresh` = `stability_score_thresh` = {iou:g}:" if iou == stability
                  else f"`pred_iou_thresh` = {iou:g}, `stability_score_thresh` = {stability:g}:")
    every = quoted(method["peak_memory"], r"every (\d+ ms)")
    match_iou = quoted(method["parity"], r"IoU >= ([\d.]+)")
    rows: Figures = {
        "worker process per model": [f"({' / '.join(str(t) for t in sorted(threads))} torch threads)"],
        "timed calls per side": [timed_calls(method["samples"])],
        "Peak memory: the proportional set size": [f"sampled every {every}"],
        "matched one to one at": [f"IoU ≥ {match_iou}"],
        "* `scenes/card`:": [f"held-out scene {scene['scene']} ({scene['width']}×{scene['height']} px, "
                             f"{scene['instances']} objects)"],
        "thresholds its model card gives": [f"(`pred_iou_thresh` {card['pred_iou_thresh']:g}, "
                                            f"`stability_score_thresh` {card['stability_score_thresh']:g})"],
        "* `vit_b/no_filter`:": [f"the {synthetic['width']}×{synthetic['height']} synthetic image, `points_per_side` = "
                                 f"{no_filter['points_per_side']}"],
        "nothing is filtered before NMS": [thresholds],
        "| case |": [f"(speedup ≥ {targets['speedup_excluding_encoder']:g}, "
                     f"memory ≤ {targets['peak_memory_ratio']:g})"],
    }
    shown = {True: "yes", False: "no"}
    for name, case in cases.items():
        official, ours, parity, done = case["official"], case["ours"], case["parity"], case["targets_met"]
        times = [f"{side['median_s']:.1f} s ({side['min_s']:.1f}–{side['max_s']:.1f})" for side in (official, ours)]
        masks = f"{parity['official_masks']} / {parity['our_masks']}" + (
            f", {parity['matched_iou_0.95']} matched" if parity["parity"] == "measured" else f": {parity['parity']}")
        rows[f"| `{name}` |"] = [
            f"| {times[0]} | {times[1]} | {case['speedup']:.2f} | "
            f"{official['peak_bytes'] / 2**20:.0f} / {ours['peak_bytes'] / 2**20:.0f} MiB "
            f"({case['peak_memory_ratio']:.2f}) | {masks} | "
            f"speedup {shown.get(done['speedup_excluding_encoder'], 'n/a')}, "
            f"memory {shown.get(done['peak_memory_ratio'], 'n/a')} |"]
    vit_b, scenes = cases["vit_b/no_filter"], cases["scenes/card"]
    rows["The speedup target ("] = [
        f"≥ {targets['speedup_excluding_encoder']:g} with the encoder excluded) is "
        f"{met(vit_b['targets_met']['speedup_excluding_encoder'])} on vit_b ({vit_b['speedup']:.2f};"]
    rows["the CPU-speed issue's ≥ 6"] = [f"{met(vit_b['speedup'] >= CPU_SPEED_ISSUE_SPEEDUP)} at "
                                         f"{no_filter['points_per_side']} points per side"]
    rows["with the scenes model ("] = [f"{met(scenes['targets_met']['speedup_excluding_encoder'])} with the scenes "
                                       f"model ({scenes['speedup']:.2f} at the card's thresholds"]
    return rows


def throughput_figures() -> Figures:
    """docs/observability.md: hot Segment throughput by concurrency vs the bare decoder (throughput_cpu.json)."""
    data = results("throughput_cpu.json")
    knee, targets, curves = data["knee"], data["targets"], data["results"]
    levels = [point["concurrency"] for point in curves["gateway_segment"]]
    rates = [point["throughput_per_s"] for curve in curves.values() for point in curve]
    bare = {point["concurrency"]: point["throughput_per_s"] for point in curves["bare_decoder"]}
    shares = [point["throughput_per_s"] / bare[point["concurrency"]] for point in curves["gateway_segment"]]
    clients = knee["concurrency"]
    return {
        "the knee is at": [
            f"On the {data['environment']['cpu']['cores']}-core CPU",
            f"the knee is at {clients} client{'s' if clients > 1 else ''} with {knee['gateway_throughput_per_s']:.1f} "
            f"calls/s = {knee['ratio_to_ceiling']:.2f} of the bare decoder's {knee['bare_throughput_per_s']:.1f} "
            f"(target ≥ {targets['ratio_to_ceiling']:g}), p99/p50 = {knee['p99_over_p50']:.2f} "
            f"(target ≤ {targets['p99_over_p50']:g})"],
        "Both curves stay between": [
            f"between {min(rates):.0f} and {max(rates):.0f} calls/s from {min(levels)} to {max(levels)} clients (the "
            f"decoder is CPU-bound on {data['environment']['cpu']['cores']} cores); the gateway keeps "
            f"{min(shares):.2f}-{max(shares):.2f} of the bare decoder at every level"],
    }


def export_figures() -> Figures:
    """docs/models.md: export accuracy, time and memory, vit_b and ViT-H (export_cpu.json)."""
    data = results("export_cpu.json")
    vit_b, vit_h = data["variants"]["vit_b"], data["variants"]["vit_h"]
    encoder_bytes = sum(size for name, size in vit_h["files_bytes"].items() if name.startswith("encoder."))
    return {
        "or the export fails": [
            f"below {power_of_ten(data['relative_error_limit'])}, or the export fails",
            f"vit_b encoder {sci(vit_b['encoder_relative_error'])}, decoder {sci(vit_b['decoder_relative_error'])}; "
            f"ViT-H encoder {sci(vit_h['encoder_relative_error'])}, decoder {sci(vit_h['decoder_relative_error'])})"],
        "Graphs above": [f"(ViT-H's encoder is {encoder_bytes / 1e9:.1f} GB)"],
        "ViT-H's export takes": [
            f"takes {vit_h['wall_clock_s'] / 60:.1f} minutes and {vit_h['peak_rss_bytes'] / 1e9:.1f} GB of memory on "
            f"the {data['environment']['cpu']['cores']}-core CPU",
            f"vit_b: {vit_b['wall_clock_s'] / 60:.1f} minutes, {vit_b['peak_rss_bytes'] / 1e9:.1f} GB)"],
    }


def transports() -> tuple[str, str, str]:
    """The embedding transports per bare decoder call: shared memory, inline gRPC (models_cpu.json)."""
    data = results("models_cpu.json")
    r = data["results"]
    return (f"{data['environment']['cpu']['cores']}-core CPU", ms(r["triton_decoder_bare"], 1),
            ms(r["triton_decoder_bare_embedding_inline_grpc"], 1))


def transports_figures() -> Figures:
    """docs/models.md: shared memory vs inline gRPC (models_cpu.json)."""
    cpu, shm, grpc = transports()
    return {"Measured with vit_b on the": [f"{cpu}: {shm} vs {grpc} per bare decoder call"]}


def sidecar_figures() -> Figures:
    """docs/deploy.md: why the sidecar passes embeddings by reference (models_cpu.json)."""
    cpu, shm, grpc = transports()
    return {"(with vit_b on the": [cpu],
            "a bare decoder call took": [f"took {shm} with the embedding in shared memory, {grpc} with it sent inline"]}


QUALITY_ROWS = {"miou_point_top": "| one point (farthest interior point)",
                "miou_point_oracle": "| one point, best of the three masks",
                "miou_box": "| tight box,", "miou_interactive_3": "| three interactive points,",
                "iou_pearson": "| Pearson("}
SIZE_METRICS = ("miou_point_top", "miou_point_oracle", "miou_box", "miou_interactive_3")


def quality_figures() -> Figures:
    """docs/models.md: the shipped model's quality against its targets, overall and by object size
    (tiny_quality.json)."""
    data = results("tiny_quality.json")
    rows: Figures = {"Its quality on": [f"on {data['summary']['scenes']} held-out scenes"]}
    for metric, label in QUALITY_ROWS.items():
        target = data["targets"][metric]
        rows[label] = [f"| ≥ {target['target']:g} | {target['value']:.3f} | {'yes' if target['met'] else '**no**'} |"]
    for size in ("small", "medium", "large"):
        entry = data["by_size"][size]
        rows[f"| {size} ("] = [f"| {entry['objects']} | " + " | ".join(f"{entry[m]:.3f}" for m in SIZE_METRICS) + " |"]
    return rows


def cpu_targets_figures() -> Figures:
    """docs/cpu-runtimes.md: the targets table's order of the fp32 error (backends_cpu.json)."""
    onnx = results("backends_cpu.json")["runtimes"]["cpu-onnxruntime"]
    error = max(onnx["encoder_relative_error"], onnx["decoder_relative_error"])
    return {"| `cpu-onnxruntime` |": [f"(relative error ~{power_of_ten(error)})"]}


def bf16_gate_figures() -> Figures:
    """docs/cpu-runtimes.md: the bf16 target's mask gates (precision_cpu.json `cpu_targets`, its limits) and its
    tensor error (backends_cpu.json)."""
    precision = results("precision_cpu.json")
    limits, gate = precision["limits"], precision["cpu_targets"]["cpu-openvino-bf16"]
    agreement, scenes = gate["vit_b_random"], gate["scenes"]
    bf16_error = results("backends_cpu.json")["runtimes"]["cpu-openvino-bf16"]["encoder_relative_error"]
    return {
        "bf16's relative error": [f"(~{power_of_ten(bf16_error)})"],
        "OpenVINO's own bf16 masks": [f"within the gates' {limits['miou_drop']:g}"],
        "* vit_b with seeded random weights": [f"(gates: min ≥ {limits['min_iou']:g}, median ≥ "
                                               f"{limits['median_iou']:g})"],
        "prompts (points, point pairs, boxes)": [
            f"{agreement['prompts']} prompts (points, point pairs, boxes), every prompt's masks against fp32: IoU min "
            f"{agreement['min_iou']:.4f}, median {agreement['median_iou']:.4f}"],
        "* the shipped model on the": [
            f"the {scenes['scenes']} held-out scenes: mIoU point {scenes['fp32']['miou_point_top']:.4f} → "
            f"{scenes['cpu-openvino-bf16']['miou_point_top']:.4f}, box {scenes['fp32']['miou_box']:.4f} → "
            f"{scenes['cpu-openvino-bf16']['miou_box']:.4f} (gate: a drop ≤ {limits['miou_drop']:g}"],
    }


BACKEND_NAMES = {"pytorch-official-modules": "PyTorch (the official modules)",
                 "cpu-onnxruntime": "`cpu-onnxruntime`: ONNX Runtime, fp32",
                 "cpu-openvino": "`cpu-openvino`: OpenVINO, fp32",
                 "cpu-openvino-bf16": "`cpu-openvino-bf16`: OpenVINO, encoder bf16, decoder fp32",
                 "openvino-bf16-decoder": "not served: OpenVINO's decoder in bf16",
                 "onnxruntime-int8-decoder": "not served: ONNX Runtime's decoder, dynamic int8"}


def backends_figures() -> Figures:
    """docs/cpu-runtimes.md: ONNX Runtime vs OpenVINO vs PyTorch in process (backends_cpu.json), `auto` served
    through Triton (models_cpu.json) and the decoder gates' limits (precision_cpu.json); the "Across CPUs" row of
    the CPU these results were measured on."""
    data = results("backends_cpu.json")
    runtimes, auto, batch = data["runtimes"], data["auto"], data["batch_prompts"]
    models = results("models_cpu.json")
    limits = results("precision_cpu.json")["limits"]
    rows: Figures = {
        "**Measured** in one run": [cores(data)],
        "with all mask tokens": [f"and {batch} such prompts in one run"],
        "| runtime |": [f"| decoder, {batch} prompts |"],
    }
    for key, name in BACKEND_NAMES.items():
        r = runtimes[key]
        encoder = ms(r["encoder"], 0) if "encoder" in r else "—"
        errors = "—" if key.startswith("pytorch") else " / ".join(
            sci(r[f"{stage}_relative_error"]) if f"{stage}_relative_error" in r else "—"
            for stage in ("encoder", "decoder"))
        rows[f"| {name} |"] = [f"| {encoder} | {ms(r['decoder'], 1)} | {ms(r['decoder_16'], 0)} | {errors} |"]
    rows["On this CPU `auto` picks"] = [f"the encoder of `{auto['encoder']}` and the decoder of `{auto['decoder']}`"]

    def median(runtime: str, stage: str) -> float:
        return runtimes[runtime][stage]["median_ms"]

    rows["the official modules' time in-process"] = [
        f"{median('cpu-openvino-bf16', 'encoder') / median('pytorch-official-modules', 'encoder'):.2f}× the official "
        "modules' time in-process"]
    served = models["auto"]
    rows["embedding (preprocessing + the Triton encoder)"] = [
        f"takes {served['ratios']['encoder']:.2f}× the official `set_image` (target ≤ {served['targets']['encoder']:g} "
        f"on CPUs with bf16: {met(served['targets_met']['encoder'])})",
        f"against {models['ratios']['encoder']:.2f} for `cpu-onnxruntime` (target ≤ {models['targets']['encoder']:g} "
        f"in fp32: {met(models['targets_met']['encoder'])})"]
    fp32 = "cpu-onnxruntime"
    rows["OpenVINO's decoder in bf16 takes"] = [
        f"{median('openvino-bf16-decoder', 'decoder') / median(fp32, 'decoder'):.2f}× ONNX Runtime fp32's"]
    rows["every MatMul)"] = [
        f"{median('onnxruntime-int8-decoder', 'decoder') / median(fp32, 'decoder'):.2f}× "
        f"({median('onnxruntime-int8-decoder', 'decoder_16') / median(fp32, 'decoder_16'):.2f}× for {batch} prompts)"]
    verdict = {True: "passes", False: "**fails**"}
    bf16, int8 = (runtimes[key]["vit_b_mask_gate"] for key in ("openvino-bf16-decoder", "onnxruntime-int8-decoder"))
    rows["encoder (the vit_b gate:"] = [
        f"min ≥ {limits['min_iou']:g}, median ≥ {limits['median_iou']:g}): bf16 IoU min {bf16['min_iou']:.4f}, "
        f"median {bf16['median_iou']:.4f} ({verdict[bf16['met']]}"]
    rows["A decoder's logits are thresholded"] = [
        f"IoU min {int8['min_iou']:.4f}, median {int8['median_iou']:.4f} ({verdict[int8['met']]})"]

    rows.update(across_cpus_rows())
    return rows


def across_cpus_rows() -> Figures:
    """The "Across CPUs" table: one row per CPU file in bench/results/cpus/ (backends_cpu.py writes this CPU's),
    labelled by its file name; a CPU without a row, or a row without a file, fails the check."""
    rows: Figures = {}
    for path in sorted((ROOT / "bench" / "results" / "cpus").glob("*.json")):
        data = json.loads(path.read_text())
        machine, medians, auto = data["environment"], data["median_ms"], data["auto"]
        cpu = machine["cpu"]

        def pair(runtime: str, decoder_runtime: str | None = None, medians: dict = medians) -> str:
            return f"{medians[runtime]['encoder']:.0f} / {medians[decoder_runtime or runtime]['decoder']:.0f}"

        rows[f"| `cpus/{path.name}` |"] = [
            f"{cpu['model']} ({cpu['vendor']} family {cpu['family']} model {cpu['model_number']} stepping "
            f"{cpu['stepping']}; {' '.join(cpu['flags']) or 'none of the flags'})",
            f"| {pair('pytorch-official-modules')} | {pair('cpu-onnxruntime')} | {pair('cpu-openvino')} | "
            f"{pair('cpu-openvino-bf16', 'openvino-bf16-decoder')} | encoder `{auto['encoder']}`, decoder "
            f"`{auto['decoder']}` | {machine['commit'][:7]}, {machine['date'][:10]} |"]
    return rows


def precision_figures() -> Figures:
    """docs/gpu.md: the mixed-precision graphs' masks against fp32 and the fp16 file size (precision_cpu.json)."""
    data = results("precision_cpu.json")
    agreement, scenes, limits = data["vit_b_random"], data["scenes"], data["limits"]
    images = len(agreement["images"])
    return {
        "bench/results/precision_cpu.json, on the": [cores(data)],
        "vit_b's encoder file is": [f"{data['graphs']['vit_b']['encoder.fp16']['size_ratio']:.2f} of the fp32 one"],
        "prompts on": [f"{agreement['prompts']} prompts on {images} image{'s' if images > 1 else ''}",
                       f"IoU min {agreement['min_iou']:.4f}, median {agreement['median_iou']:.4f} (gate: "
                       f"{limits['min_iou']:g} / {limits['median_iou']:g})"],
        "the shipped scenes model on the": [
            f"the {scenes['scenes']} held-out scenes: mIoU point {scenes['fp32']['miou_point_top']:.4f} → "
            f"{scenes['fp16']['miou_point_top']:.4f}, box {scenes['fp32']['miou_box']:.4f} → "
            f"{scenes['fp16']['miou_box']:.4f} (gate: a drop of at most {limits['miou_drop']:g})"],
    }


def multihost_figures() -> Figures:
    """docs/deploy.md: a Redis fetch's cost between pods, plain and delayed links (multihost_cpu.json)."""
    data = results("multihost_cpu.json")
    links = {link["delay_ms_each_way"]: link for link in data["links"]}
    plain, delayed = links[0.0], links[max(links)]
    embedding = f"{data['model']['embedding_bytes_fp16'] / 2**20:g} MiB"
    return {
        "**Measured** (": [cores(data)],
        "with two pods serving vit_b": [
            f"a {embedding} fp16 embedding",
            f"the Redis round trip from the client host is {plain['redis_ping']['median_ms']:.2f} ms on plain links "
            f"and {delayed['redis_ping']['median_ms']:.2f} ms over the delayed ones"],
        "takes longer than its second": [
            f"by +{plain['tier2_fetch_ms']:.1f} ms on plain links and +{delayed['tier2_fetch_ms']:.1f} ms over the "
            f"delayed ones (medians of {data['sampling']['images']} image ids each)",
            f"Moving and staging {embedding}"],
        "TCP's first window": [f"does not hold {embedding}"],
    }


def images_figures() -> Figures:
    """docs/deploy.md: the images `make e2e` builds (images_cpu.json)."""
    data = results("images_cpu.json")
    rows: Figures = {"Measured on the": [cores(data)]}
    for key, image in data["images"].items():
        rows[f"| {key} |"] = [f"| `{image['tag']}` | {image['size_mb']:.0f} MB | {image['build_seconds']:.0f} s |"]
    return rows


def pods_figures() -> Figures:
    """docs/deploy.md: the chart's pods under `make e2e` (pods_cpu.json)."""
    pods = results("pods_cpu.json")
    cold = sorted(pods["cold_start_s"].values())
    locust, killed = pods["locust"], pods["pod_killed_under_load"]
    return {
        "Cold start (": [f"{cold[0]:.0f} s and {cold[-1]:.0f} s", f"prepared claim: {pods['warm_start_s']:.0f} s"],
        "Locust `MixedUser`": [f"{locust['users']} users: {locust['requests']} calls in {locust['seconds']} s "
                               f"({locust['requests_per_s']:.1f} calls/s), {locust['failures']} failures, p50 "
                               f"{locust['p50_ms']:.0f} ms, p95 {locust['p95_ms']:.0f} ms"],
        "one pod killed": [f"{killed['calls_before']} calls before the kill, {killed['calls_after']} after, "
                           f"{killed['failed']} failed"],
    }


def browser_figures() -> Figures:
    """docs/http.md: the web page's hover-to-mask latency in chromium (browser_cpu.json)."""
    data = results("browser_cpu.json")
    r, target = data["results"], data["targets"]["hover_to_mask_p50_ms"]
    shown, drawn = r["hover_to_next_frame"], r["hover_to_drawn"]
    return {"from the pointer event to the frame": [
        f"AMD EPYC {data['environment']['cpu']['cores']} cores",
        f"p50 {shown['p50_ms']:.1f} ms, p90 {shown['p90_ms']:.1f} ms from the pointer event to the frame that shows "
        f"the mask (target p50 <= {target:g} ms: {met(data['targets_met']['hover_to_mask_p50_ms'])})",
        f"drawn into the canvas at p50 {drawn['p50_ms']:.1f} ms",
        f"{r['decode_and_upscale']['p50_ms']:.1f} ms of it the decoder run and upscaling"]}


def request_memory_figures() -> Figures:
    """docs/security.md: the gateway's peak memory growth per large request (request_memory_cpu.json)."""
    data = results("request_memory_cpu.json")
    limit = quoted(data["target"], r"<= (\d+(?:\.\d+)? [GM]B)")
    rows: Figures = {"its peak resident memory during the call": [f"(target: at most {limit}"],
                     "| case | request |": [f"| ≤ {limit} |"]}
    for case in data["cases"]:
        rows[f"| `{case['case']}` |"] = [
            f"| {case['request']} | {case['code']} | {case['seconds']:.0f} s | "
            f"{case['peak_growth_bytes'] / 1e6:.0f} MB | {'yes' if case['target_met'] else 'no'} |"]
    return rows


def soak_figures() -> Figures:
    """docs/reliability.md: the chaos soak, overall, per fault and its targets (soak_cpu.json)."""
    data = results("soak_cpu.json")
    phases, by_fault, targets = data["phases"], data["by_fault"], data["targets"]
    probe = data["no_retry_probe"]["by_fault"]
    requests = sum(phase["requests"] for phase in phases)
    failed = requests - sum(phase["ok"] for phase in phases)
    verdicts = [phase["verdicts"] for phase in phases]
    exact, close = sum(v.get("exact", 0) for v in verdicts), sum(v.get("close", 0) for v in verdicts)
    in_a_row = quoted(data["recovery"], r"first of (\d+) consecutive")
    rows: Figures = {
        "answers exact and the other": [
            f"{requests} calls in {data['duration_s'] / 60:.0f} minutes on the {cores(data)}",
            f"{failed} failed, {sum(phase['wrong_answers'] for phase in phases)} wrong, {exact} answers exact and the "
            f"other {close} close"],
        "to the end of the first": [f"first {in_a_row} successes in a row"],
    }
    for fault, entry in by_fault.items():
        failures = ", ".join(f"{code} {n}" for code, n in entry["failures_by_code"].items()) or "0"
        lost = ", ".join(f"{code} {n}" for code, n in probe[fault]["failures_by_code"].items()) or "0"
        rows[f"| `{fault}` |"] = [
            f"| {entry['runs']} | {entry['requests']} | {failures} | {entry['wrong_answers']} | "
            f"{entry['p50_ms']:.0f} / {entry['p99_ms']:.0f} ms | {entry['worst_recovery_s']:.2f} s | {lost} |"]
    no_failure_faults = ("redis_sigkill", "redis_slow", "gateway_rolling_restart")
    verdict = "all met" if all(value is True for value in data["targets_met"].values()) else "not all met"
    rows["failed calls through the Redis faults"] = [
        f"Targets, {verdict}: {targets['no_wrong_answers']['measured']} wrong answers; "
        f"{sum(sum(by_fault[f]['failures_by_code'].values()) for f in no_failure_faults)} failed calls through the "
        "Redis faults and the rolling restart"]
    if "rolling_restart_no_resends" in targets:
        resends = targets["rolling_restart_no_resends"]
        rows["image re-sends after NOT_FOUND"] = [f"{resends['measured']} image re-sends after NOT_FOUND",
                                                  f"({met(resends['met'])})"]
    triton = targets["triton_recovery_within_30s"]
    within = quoted(triton["target"], r"within (\d+ s)")
    rows["of Triton being ready"] = [f"within {within} of Triton being ready (at most "
                                     f"{max(triton['measured']['recovery_s']):.2f} s)"]
    bursts = [phase["details"] for phase in phases if phase["name"] == "memory_limited_gateway"]
    latencies = [seconds for burst in bursts for seconds in burst["latencies_s"]]
    rows["after every burst"] = [
        f"every {max(burst['image_pixels'] for burst in bursts) / 1e6:.0f}-megapixel image answered (peak resident "
        f"memory {max(burst['peak_rss_bytes'] for burst in bursts) / 1e9:.2f} GB of its "
        f"{min(burst['limit_bytes'] for burst in bursts) / 2**30:g} GiB; its images were answered in "
        f"{min(latencies):.1f}-{max(latencies):.1f} s)"]
    return rows


def polygons_figures() -> Figures:
    """docs/api.md: polygons' IoU with their masks at the default tolerance, served and noisy (polygons_cpu.json)."""
    cases = results("polygons_cpu.json")["cases"]
    served, noisy = cases["scenes"], cases["noisy"]

    def iou(case: dict[str, Any]) -> list[str]:
        return [f"IoU ≥ {case['iou']['min']:.4f}", f"(median {case['iou']['median']:.4f})"]

    return {
        "the shipped model serves:": [f"{served['masks']} masks", *iou(served)],
        "on noisy masks:": [f"{noisy['masks']} noisy masks", *iou(noisy)],
        "With holes filled": [f"IoU ≥ {served['exteriors_only_iou']['min']:.4f} and "
                              f"{noisy['exteriors_only_iou']['min']:.4f}"],
        "of the traced outline's vertices": [
            f"keep {served['vertices_over_traced'] * 100:.0f} % and {noisy['vertices_over_traced'] * 100:.0f} %",
            f"in {served['ms_per_mask_median']:.1f} ms and {noisy['ms_per_mask_median']:.1f} ms per mask"],
    }


def interact_figures() -> Figures:
    """docs/api.md: Interact sessions' event-to-mask latency, supersession and order (interact_cpu.json)."""
    data = results("interact_cpu.json")
    levels, hot, ratios, met_ = data["levels"], data["hot_segment"], data["ratios"], data["targets_met"]

    def ms(summary: dict[str, Any], key: str = "median_ms") -> str:
        return f"{summary[key]:.2f} ms"

    one, eight, many = (levels[n]["interact"] for n in ("1", "8", "32"))
    return {
        "measured on the": [cores(data)],
        "(events answered by their own decode)": [ms(one["decoded_latency"]), ms(hot["paced"])],
        "Segment paced the same way": [f"({ratios['p50_at_1_over_hot_segment_p50']:.2f}x",
                                       f"{met(met_['p50_at_1_session'])};",
                                       f"{ratios['p50_at_1_over_back_to_back_segment_p50']:.2f}x"],
        "every event: p50": [ms(one["latency"]), f"({ratios['all_events_p50_at_1_over_hot_segment_p50']:.2f}x)"],
        "p99 at 8 sessions": [ms(eight["latency"], "p99_ms"), f"{ratios['p99_over_p50_at_8']:.2f}x",
                              met(met_["p99_at_8_sessions"])],
        "round by round from": [f"{ratios['p99_over_p50_at_8_per_round']['min']:.2f}x"],
        "a round's p99 being about": [f"{ratios['p99_over_p50_at_8_per_round']['max']:.2f}x"],
        "At 32 sessions p50": [ms(many["latency"]), ms(many["latency"], "p99_ms")],
        "Segment calls take": [ms(levels["32"]["unary"]["latency"]), ms(levels["32"]["unary"]["latency"], "p99_ms")],
        "Superseded:": [f"{levels[n]['interact']['superseded_share'] * 100:.1f} %" for n in ("1", "8", "32")],
        "answered out of order:": [str(sum(levels[n]["interact"]["out_of_order"] for n in levels))],
    }


def run_times_figures() -> Figures:
    """docs/benchmarks.md: what each benchmark took when it wrote its results file (``environment.run_s``), one row
    per file, their sum (what ``make bench-all`` spends) and the sum over the files that depend on all of
    service/samserve (what ``make bench`` spends after a change to the gateway's code)."""
    times = {}
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        run_s = json.loads(path.read_text()).get("environment", {}).get("run_s")
        if run_s is not None:
            times[path.name] = run_s
    from bench.freshness import MEASURES

    rows: Figures = {f"| `{name}` |": [f"| {seconds / 60:.1f} |"] for name, seconds in times.items()}
    rows["| all of them |"] = [f"| {sum(times.values()) / 60:.1f} |"]
    serving = sum(seconds for name, seconds in times.items() if "service/samserve" in MEASURES[name])
    quick = re.search(r"^BENCH_QUICK = (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert quick, "no BENCH_QUICK in the Makefile"
    quick_s = sum(times[f"{name}.json"] for name in quick[1].split())
    rows["| those `make bench-quick` runs |"] = [f"| {quick_s / 60:.1f} |"]
    rows["| those that measure all of `service/samserve` |"] = [f"| {serving / 60:.1f} |"]
    return rows


FIGURES: dict[str, Callable[[], Figures]] = {
    "run_times": run_times_figures,  # benchmarks.md
    "models": models_figures, "gateway": gateway_figures, "amg": amg_figures,  # benchmarks.md
    "throughput": throughput_figures,  # observability.md
    "export": export_figures, "transports": transports_figures, "quality": quality_figures,  # models.md
    "cpu_targets": cpu_targets_figures, "bf16_gate": bf16_gate_figures, "backends": backends_figures,  # cpu-runtimes
    "precision": precision_figures,  # gpu.md
    "sidecar": sidecar_figures, "multihost": multihost_figures, "images": images_figures, "pods": pods_figures,
    "browser": browser_figures,  # http.md
    "polygons": polygons_figures, "interact": interact_figures,  # api.md
    "request_memory": request_memory_figures,  # security.md
    "soak": soak_figures,  # reliability.md
}
"""Block name -> the figures its passage quotes, read from bench/results."""

CONSTANTS: dict[str, dict[str, str]] = {
    "gateway": {"≤ 3 ms": "the CPU-speed issue's gateway-overhead target; gateway_cpu.json records only its own"},
    "amg": {"(0.88 / 0.95)": "the official SamAutomaticMaskGenerator's default thresholds, a setting",
            "3 per point": "SAM's three multimask outputs per point prompt, the architecture",
            "≥ 6": "the CPU-speed issue's speedup target; amg_cpu.json records only its own"},
    "export": {"1 GiB of weights": "the exporter's external-data threshold (EXTERNAL_DATA_THRESHOLD_BYTES), a setting",
               "24 GB machine": "a machine size the figure is compared with, not a measurement"},
    "quality": {"32²": "COCO's small/medium object-size bound, a definition",
                "96²": "COCO's medium/large object-size bound, a definition"},
    "bf16_gate": {"40 held-out scenes": "the emulation check's scene count in tests/integration, a setting",
                  "−0.002": "segment-anything-fast's published int8 figure, not this project's measurement"},
    "backends": {"768×1024": "bench/backends_cpu.py's fixed input image, which backends_cpu.json does not record",
                 "thresholded at 0": "SAM's mask threshold (logit 0), the model's metadata",
                 "4× upscale": "the decoder's low-res masks are 4× the embedding's size, the architecture"},
    "multihost": {"(tier 1)": "the in-process cache tier's name"},
    "soak": {"the 1 s timeout": "SAMSERVE_REDIS_TIMEOUT_S's default, a setting"},
    "interact": {"0.2 to 0.5 s": "bench/interact_cpu.py's click gaps, its script", "every 16 ms": "its drag steps, "
                 "the script", "≤ 1.2x": "the interactive-session issue's target", "≤ 3x": "the same issue's target",
                 "at 1, 8 and 32": "the session counts, the benchmark's levels", "at 1 session": "a level",
                 "at 8 sessions": "a level", "At 32 sessions": "a level", "2-core": "the machine's name"},
}
"""Block name -> numbers in it that are not measurements (phrase -> why); each phrase must occur in its block."""


# ---------------------------------------------------------------------------------------------------------------
# Finding the blocks and the numbers in them

MARKER = re.compile(r"<!--\s*figures:\s*(?P<name>[\w.-]+)\s*-->|<!--\s*/figures\s*-->")
ANY_MARKER = re.compile(r"<!--\s*/?\s*figures\b")
LINE_START = re.compile(r"\s*(?:(?:[-*+]|\d+[.)])\s+)?")
NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)\d+(?:\.\d+)?(?:e[-−+]?\d+)?")
"""A number: not the digits of a name (fp32, p99, avx512_bf16, x86_64) nor of a hyphenated one (AVX-512, SHA-256)."""
NOT_FIGURES = [
    re.compile(r"`[^`\n]*`"),  # code spans
    re.compile(r"\]\([^)\s]*\)"),  # link targets
    re.compile(r"<!--.*?-->"),  # comments
    re.compile(r"\b\d{4}-\d{2}-\d{2}(?:T[\d:+.]+)?\b"),  # dates
    re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"),  # commit hashes
    re.compile(r"^\s*\|?(?:\s*:?-{3,}:?\s*\|)+\s*$"),  # table separators
]


@dataclass
class Block:
    page: Path
    name: str
    lines: list[tuple[int, str]]  # (line number in the page, text of the line inside the block)

    def where(self, number: int) -> str:
        return f"{self.page.relative_to(ROOT)}:{number}"


def parse(page: Path) -> tuple[list[Block], list[str]]:
    """The figures blocks of a page, and what is wrong with its markers."""
    text, blocks, problems = page.read_text(), [], []

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    quoting = NOT_FIGURES[0].sub(lambda span: " " * len(span.group()), text)  # a marker in a code span is quoted
    found = list(MARKER.finditer(quoting))
    if len(found) != len(ANY_MARKER.findall(quoting)):
        problems.append(f"{page.relative_to(ROOT)}: a figures marker not of the form <!-- figures: NAME --> or "
                        "<!-- /figures -->")
    opened: re.Match[str] | None = None
    for marker in found:
        line_start = text.rfind("\n", 0, marker.start()) + 1
        line_end = text.find("\n", marker.end())
        line_end = len(text) if line_end < 0 else line_end
        if LINE_START.fullmatch(text[line_start:marker.start()]) and text[marker.end():line_end].strip():
            problems.append(f"{page.relative_to(ROOT)}:{line_of(marker.start())}: a marker that starts a line (or a "
                            "list item) must be alone on it: markdown would make the rest of the line raw HTML")
        if marker.group("name"):
            if opened:
                problems.append(f"{page.relative_to(ROOT)}:{line_of(marker.start())}: block "
                                f"{marker.group('name')!r} opens inside block {opened.group('name')!r}")
            opened = marker
            continue
        if not opened:
            problems.append(f"{page.relative_to(ROOT)}:{line_of(marker.start())}: <!-- /figures --> closes no block")
            continue
        first = line_of(opened.end())
        body = text[opened.end():marker.start()].split("\n")
        blocks.append(Block(page, opened.group("name"), [(first + i, line) for i, line in enumerate(body)]))
        opened = None
    if opened:
        problems.append(f"{page.relative_to(ROOT)}:{line_of(opened.start())}: block {opened.group('name')!r} is "
                        "never closed")
    return blocks, problems


def masked(line: str) -> str:
    """The line with what is not a figure blanked out (same length, so positions stay)."""
    for pattern in NOT_FIGURES:
        line = pattern.sub(lambda found: " " * len(found.group()), line)
    return line


def value_pattern(value: str) -> re.Pattern[str]:
    """A rendered value, not as a part of a longer number (0.12 s is not in 10.12 s, 3 not in 3.5)."""
    before = r"(?<![\d.])" if value[:1].isdigit() else ""
    after = r"(?!\.?\d)" if value[-1:].isdigit() else ""
    return re.compile(before + re.escape(value) + after)


def check(block: Block, figures: Figures, constants: dict[str, str]) -> list[str]:
    """What in the block disagrees with its figures: a label not on exactly one line, a value missing from its
    label's line, a constant the block does not use, and every number that neither a value nor a constant covers."""
    problems: list[str] = []
    covered: dict[int, list[tuple[int, int]]] = {number: [] for number, _ in block.lines}
    fenced = False
    for label, values in figures.items():
        holding = [(number, line) for number, line in block.lines if label in line]
        if len(holding) != 1:
            problems.append(f"{block.where(block.lines[0][0])}: block {block.name!r}: the label {label!r} is on "
                            f"{len(holding)} lines, not on exactly one")
            continue
        number, line = holding[0]
        position = 0
        for value in values:
            found = value_pattern(value).search(line, position)
            if not found:
                problems.append(f"{block.where(number)}: block {block.name!r}, {label!r}: expected {value!r} (after "
                                f"{line[:position][-40:]!r}); bench/results says so, copy it")
                continue
            covered[number].append(found.span())
            position = found.end()
    for phrase in constants:
        spans = [(number, found.span()) for number, line in block.lines
                 for found in re.finditer(re.escape(phrase), line)]
        if not spans:
            problems.append(f"{block.where(block.lines[0][0])}: block {block.name!r}: the constant {phrase!r} is "
                            "not in the block any more; drop it from CONSTANTS")
        for number, span in spans:
            covered[number].append(span)
    for number, line in block.lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for found in NUMBER.finditer(masked(line)):
            if not any(start <= found.start() and found.end() <= end for start, end in covered[number]):
                problems.append(f"{block.where(number)}: block {block.name!r}: {found.group()!r} is not read from "
                                f"bench/results by FIGURES[{block.name!r}] nor a declared constant")
    return problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks, problems = [], []
    for page in PAGES:
        found, wrong = parse(page)
        blocks += found
        problems += wrong
    return blocks, problems


# ---------------------------------------------------------------------------------------------------------------
# The tests


def test_figures_blocks_are_well_formed_and_registered():
    blocks, problems = all_blocks()
    names = [block.name for block in blocks]
    problems += [f"{block.where(block.lines[0][0])}: block {block.name!r} is not in FIGURES" for block in blocks
                 if block.name not in FIGURES]
    problems += [f"FIGURES[{name!r}] has no block in README.md or docs/" for name in FIGURES if name not in names]
    problems += [f"block {name!r} appears {names.count(name)} times; a name marks one passage"
                 for name in sorted(set(names)) if names.count(name) > 1]
    problems += [f"CONSTANTS[{name!r}] names no block in FIGURES" for name in CONSTANTS if name not in FIGURES]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_number_in_a_figures_block_is_read_from_bench_results(name):
    blocks = [block for block in all_blocks()[0] if block.name == name]
    assert blocks, f"no <!-- figures: {name} --> block in README.md or docs/"
    problems = [problem for block in blocks for problem in check(block, FIGURES[name](), CONSTANTS.get(name, {}))]
    assert not problems, "\n".join(problems)


def test_the_check_catches_an_unbacked_figure():
    """The check itself: a number no figure renders fails, naming its line; a rendered one passes."""
    block = Block(ROOT / "README.md", "example",
                  [(7, "| cold Embed RPC | 7103 ms | 12 s |"), (8, "`x 5` fp32 AVX-512 2026-11-28")])
    problems = check(block, {"| cold Embed RPC |": ["7103 ms"]}, {})
    assert problems == ["README.md:7: block 'example': '12' is not read from bench/results by FIGURES['example'] "
                        "nor a declared constant"]
    assert check(block, {"| cold Embed RPC |": ["7103 ms", "12 s"]}, {}) == []
    assert check(block, {"| cold Embed RPC |": ["7103 ms"]}, {"12 s": "a setting"}) == []
    assert "expected '7.1 s'" in check(block, {"| cold Embed RPC |": ["7.1 s", "12 s"]}, {})[0]
