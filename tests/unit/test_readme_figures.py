"""The benchmark figures the docs quote are the ones in bench/results (the JSON is the source; docs/*.md copy it).

Each figure is checked in the page that quotes it (the README links to docs/; the figures moved there with their
sections)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def results(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


def models_rows() -> list[str]:
    data = results("models_cpu.json")
    r, ratios = data["results"], data["ratios"]
    return [
        f"| encoder (`set_image` vs preprocessing + Triton encoder) | {r['official_set_image']['median_ms']:.0f} ms | "
        f"{r['triton_encoder']['median_ms']:.0f} ms | {ratios['encoder']:.2f} |",
        f"| decoder (`predict`, 1 point, multimask vs Triton decoder + postprocessing) | "
        f"{r['official_predict']['median_ms']:.1f} ms | "
        f"{r['triton_decoder_plus_postprocessing']['median_ms']:.1f} ms | {ratios['decoder_path']:.2f} |",
    ]


def transport_rows() -> list[str]:
    """The embedding transports: shared memory vs inline gRPC per bare decoder call (models_cpu.json)."""
    r = results("models_cpu.json")["results"]
    return [f"{r['triton_decoder_bare']['median_ms']:.1f} ms vs "
            f"{r['triton_decoder_bare_embedding_inline_grpc']['median_ms']:.1f} ms per bare decoder call"]


def gateway_rows() -> list[str]:
    data = results("gateway_cpu.json")
    r, figures = data["results"], data["figures"]
    unit = {"official_set_image": "{:.0f} ms", "cold_embed_rpc": "{:.0f} ms"}
    rows = []
    for key in ("official_set_image", "cold_embed_rpc", "official_predict", "hot_segment_rpc", "bare_triton_decoder"):
        form = unit.get(key, "{:.1f} ms")
        rows.append(" | ".join(form.format(r[key][p]) for p in ("median_ms", "p90_ms", "p99_ms")) + " |")
    rows.append(f"Hot Segment / official predict = {figures['hot_over_official_predict']:.2f}")
    rows.append(f"cold / hot = {figures['cold_over_hot']:.0f}")
    rows.append(f"= {figures['gateway_overhead_ms']:.1f} ms")
    return rows


def throughput_rows() -> list[str]:
    knee = results("throughput_cpu.json")["knee"]
    return [
        f"the knee is at {knee['concurrency']} client{'s' if knee['concurrency'] > 1 else ''} with "
        f"{knee['gateway_throughput_per_s']:.1f} calls/s = {knee['ratio_to_ceiling']:.2f} of the bare decoder's "
        f"{knee['bare_throughput_per_s']:.1f}",
        f"p99/p50 = {knee['p99_over_p50']:.2f}",
    ]


def sci(value: float) -> str:
    """1 significant decimal, exponent without padding: 2.3e-6."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


BACKEND_NAMES = {"pytorch-official-modules": "PyTorch (the official modules)",
                 "cpu-onnxruntime": "`cpu-onnxruntime`: ONNX Runtime, fp32",
                 "cpu-openvino": "`cpu-openvino`: OpenVINO, fp32",
                 "cpu-openvino-bf16": "`cpu-openvino-bf16`: OpenVINO, encoder bf16, decoder fp32",
                 "openvino-bf16-decoder": "not served: OpenVINO's decoder in bf16",
                 "onnxruntime-int8-decoder": "not served: ONNX Runtime's decoder, dynamic int8"}


def backends_rows() -> list[str]:
    data = results("backends_cpu.json")
    runtimes, auto = data["runtimes"], data["auto"]
    rows = []
    for key, name in BACKEND_NAMES.items():
        r = runtimes[key]
        encoder = f"{r['encoder']['median_ms']:.0f} ms" if "encoder" in r else "—"
        errors = "—" if key.startswith("pytorch") else " / ".join(
            sci(r[f"{stage}_relative_error"]) if f"{stage}_relative_error" in r else "—"
            for stage in ("encoder", "decoder"))
        rows.append(f"| {name} | {encoder} | {r['decoder']['median_ms']:.1f} ms | "
                    f"{r['decoder_16']['median_ms']:.0f} ms | {errors} |")
    rows.append(f"On this CPU `auto` picks the encoder of `{auto['encoder']}` and the decoder of `{auto['decoder']}`")
    for key in ("openvino-bf16-decoder", "onnxruntime-int8-decoder"):
        gate = runtimes[key]["vit_b_mask_gate"]
        rows.append(f"IoU min {gate['min_iou']:.4f}, median {gate['median_iou']:.4f}")
    return rows


def cpu_target_rows() -> list[str]:
    gate = results("precision_cpu.json")["cpu_targets"]["cpu-openvino-bf16"]
    agreement, scenes = gate["vit_b_random"], gate["scenes"]
    auto, fp32 = results("models_cpu.json")["auto"], results("models_cpu.json")["ratios"]
    return [f"{agreement['prompts']} prompts (points, point pairs, boxes), every prompt's masks against fp32: IoU min "
            f"{agreement['min_iou']:.4f}, median {agreement['median_iou']:.4f}",
            f"mIoU point {scenes['fp32']['miou_point_top']:.4f} → {scenes['cpu-openvino-bf16']['miou_point_top']:.4f}, "
            f"box {scenes['fp32']['miou_box']:.4f} → {scenes['cpu-openvino-bf16']['miou_box']:.4f}",
            f"takes {auto['ratios']['encoder']:.2f}× the official `set_image`",
            f"against {fp32['encoder']:.2f} for `cpu-onnxruntime`"]


def quality_rows() -> list[str]:
    data = results("tiny_quality.json")
    summary, by_size = data["summary"], data["by_size"]
    metrics = ("miou_point_top", "miou_point_oracle", "miou_box", "miou_interactive_3")
    rows = [f"| {data['targets'][m]['value']:.3f} | {'yes' if data['targets'][m]['met'] else '**no**'} |"
            for m in (*metrics, "iou_pearson")]
    rows.append(f"Its quality on {summary['scenes']} held-out scenes")
    rows += [f"| {by_size[size]['objects']} | " + " | ".join(f"{by_size[size][m]:.3f}" for m in metrics) + " |"
             for size in ("small", "medium", "large")]
    return rows


def export_rows() -> list[str]:
    variants = results("export_cpu.json")["variants"]
    vit_b, vit_h = variants["vit_b"], variants["vit_h"]
    return [
        f"(measured, bench/results/export_cpu.json: vit_b encoder {sci(vit_b['encoder_relative_error'])}, decoder "
        f"{sci(vit_b['decoder_relative_error'])}; ViT-H encoder {sci(vit_h['encoder_relative_error'])}, decoder "
        f"{sci(vit_h['decoder_relative_error'])})",
        f"ViT-H's export takes {vit_h['wall_clock_s'] / 60:.1f} minutes and {vit_h['peak_rss_bytes'] / 1e9:.1f} GB "
        f"of memory on the 2-core CPU",
        f"vit_b: {vit_b['wall_clock_s'] / 60:.1f} minutes, {vit_b['peak_rss_bytes'] / 1e9:.1f} GB",
    ]


def amg_rows() -> list[str]:
    """The segment-everything table, a row per case: medians (min-max), speedup, peak memory, masks, targets;
    0 masks on both sides reads "not applicable", never a parity score."""
    data = results("amg_cpu.json")
    image = data["models"]["scenes"]["image"]
    rows = [f"{data['method']['samples']} timed calls per side",
            f"held-out scene {image['scene']} ({image['width']}×{image['height']} px, "
            f"{image['instances']} objects)",
            f"`points_per_side` = {data['cases']['vit_b/no_filter']['parameters']['points_per_side']}"]
    shown = {True: "yes", False: "no"}
    for name, case in data["cases"].items():
        official, ours, parity, met = case["official"], case["ours"], case["parity"], case["targets_met"]
        times = [f"{side['median_s']:.1f} s ({side['min_s']:.1f}–{side['max_s']:.1f})" for side in (official, ours)]
        masks = f"{parity['official_masks']} / {parity['our_masks']}" + (
            f", {parity['matched_iou_0.95']} matched" if parity["parity"] == "measured" else f": {parity['parity']}")
        rows.append(
            f"| `{name}` | {times[0]} | {times[1]} | {case['speedup']:.2f} | "
            f"{official['peak_bytes'] / 2**20:.0f} / {ours['peak_bytes'] / 2**20:.0f} MiB "
            f"({case['peak_memory_ratio']:.2f}) | {masks} | "
            f"speedup {shown.get(met['speedup_excluding_encoder'], 'n/a')}, "
            f"memory {shown.get(met['peak_memory_ratio'], 'n/a')} |")
    return rows


def request_memory_rows() -> list[str]:
    data = results("request_memory_cpu.json")
    return [f"| `{case['case']}` | {case['request']} | {case['code']} | {case['seconds']:.0f} s | "
            f"{case['peak_growth_bytes'] / 1e6:.0f} MB | {'yes' if case['target_met'] else 'no'} |"
            for case in data["cases"]]


def soak_rows() -> list[str]:
    data = results("soak_cpu.json")
    probe = data["no_retry_probe"]["by_fault"]
    rows = [f"{sum(phase['requests'] for phase in data['phases'])} calls in {data['duration_s'] / 60:.0f} minutes"]
    for fault, entry in data["by_fault"].items():
        failures = ", ".join(f"{code} {n}" for code, n in entry["failures_by_code"].items()) or "0"
        lost = ", ".join(f"{code} {n}" for code, n in probe[fault]["failures_by_code"].items()) or "0"
        rows.append(f"| `{fault}` | {entry['runs']} | {entry['requests']} | {failures} | {entry['wrong_answers']} | "
                    f"{entry['p50_ms']:.0f} / {entry['p99_ms']:.0f} ms | {entry['worst_recovery_s']:.2f} s | {lost} |")
    return rows


def browser_rows() -> list[str]:
    r = results("browser_cpu.json")["results"]
    return [f"p50 {r['hover_to_drawn']['p50_ms']:.1f} ms, p90 {r['hover_to_drawn']['p90_ms']:.1f} ms from the pointer "
            f"event to the mask drawn, {r['decode_and_upscale']['p50_ms']:.1f} ms of it the decoder run and upscaling"]


def multihost_rows() -> list[str]:
    links = {link["delay_ms_each_way"]: link for link in results("multihost_cpu.json")["links"]}
    plain, delayed = links[0.0], links[1.0]
    return [f"the Redis round trip from the client host is {plain['redis_ping']['median_ms']:.2f} ms on plain links "
            f"and {delayed['redis_ping']['median_ms']:.2f} ms over the delayed ones",
            f"+{plain['tier2_fetch_ms']:.1f} ms on plain links and +{delayed['tier2_fetch_ms']:.1f} ms over the "
            f"delayed ones"]


def precision_rows() -> list[str]:
    data = results("precision_cpu.json")
    agreement, scenes = data["vit_b_random"], data["scenes"]
    images = len(agreement["images"])
    return [f"{agreement['prompts']} prompts on {images} image{'s' if images > 1 else ''}, every prompt's masks "
            f"against the fp32 graph's: IoU min "
            f"{agreement['min_iou']:.4f}, median {agreement['median_iou']:.4f}",
            f"mIoU point {scenes['fp32']['miou_point_top']:.4f} → {scenes['fp16']['miou_point_top']:.4f}, box "
            f"{scenes['fp32']['miou_box']:.4f} → {scenes['fp16']['miou_box']:.4f}",
            f"vit_b's encoder file is {data['graphs']['vit_b']['encoder.fp16']['size_ratio']:.2f} of the fp32 one"]


def deploy_rows() -> list[str]:
    """The Deploy section's "Run here" figures: images_cpu.json and pods_cpu.json (`make e2e`)."""
    images = results("images_cpu.json")["images"]
    pods = results("pods_cpu.json")
    rows = [f"| {key} | `{image['tag']}` | {image['size_mb']:.0f} MB | {image['build_seconds']:.0f} s |"
            for key, image in images.items()]
    cold = sorted(pods["cold_start_s"].values())
    locust, killed = pods["locust"], pods["pod_killed_under_load"]
    rows += [f"Cold start (container start to SERVING, both pods at once, the prepare init container exporting the "
             f"shipped model included): {cold[0]:.0f} s and {cold[-1]:.0f} s; the killed pod started again on the "
             f"prepared claim: {pods['warm_start_s']:.0f} s",
             f"{locust['requests']} calls in {locust['seconds']} s ({locust['requests_per_s']:.1f} calls/s), "
             f"{locust['failures']} failures, p50 {locust['p50_ms']:.0f} ms, p95 {locust['p95_ms']:.0f} ms",
             f"{killed['calls_before']} calls before the kill, {killed['calls_after']} after, "
             f"{killed['failed']} failed"]
    return rows


# The page each figure lives in, and the rows it must quote.
PAGES = [
    ("deploy.md", deploy_rows), ("benchmarks.md", models_rows), ("models.md", transport_rows),
    ("gpu.md", precision_rows), ("benchmarks.md", gateway_rows), ("observability.md", throughput_rows),
    ("benchmarks.md", amg_rows), ("cpu-runtimes.md", backends_rows), ("cpu-runtimes.md", cpu_target_rows),
    ("models.md", quality_rows), ("models.md", export_rows), ("security.md", request_memory_rows),
    ("reliability.md", soak_rows), ("http.md", browser_rows), ("deploy.md", multihost_rows),
]


@pytest.mark.parametrize(("page", "rows"), PAGES, ids=[f"{page}:{rows.__name__}" for page, rows in PAGES])
def test_docs_quote_the_results_files(page, rows):
    text = (DOCS / page).read_text().replace("\n", " ")
    missing = [row for row in rows() if row not in text]
    assert not missing, f"docs/{page}: figures differ from bench/results; copy these: {missing}"
