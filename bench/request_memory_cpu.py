"""How much one large request grows the gateway's memory: the cost limits of issue 15, measured on a real stack.

Each case is one request within the default limits, sent to a real `samserve gateway` process (the shipped scenes
model in Triton, no Redis) after the gateway's peak-RSS mark was reset (``/proc/<pid>/clear_refs``): growth is its
peak resident memory during the call (``VmHWM``) minus its resident memory just before; ``returned`` is how much of
that growth is gone once the call has ended. Target: growth <= 1 GB for every request within the default limits.

* ``segment_256_prompts_12mp``: 256 one-point prompts, multimask, RLE and PNG, on a 3000 x 4000 JPEG sent as bytes
  (the request the issue measured at 17.8 GB before masks were encoded as they were made);
* ``segment_256_prompts_12mp_logits``: the same by image id, with the low-res logits returned too;
* ``segment_16_prompts_64mp``: 16 prompts, multimask, RLE and PNG, on an 8000 x 8000 JPEG (the largest image);
* ``embed_64mp``: Embed of another 8000 x 8000 JPEG;
* ``generate_masks_12mp``: GenerateMasks on a 3000 x 4000 JPEG with the model card's thresholds.

Writes request_memory_cpu.json to bench/results (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import grpc
import numpy as np
from PIL import Image

from bench.amg_cpu import CARD_THRESHOLDS, scenes_model
from bench.common import WORK, add_output_argument, environment, print_table, write_results
from samserve.core.api import pb, pb_grpc
from samserve.core.settings import GatewaySettings
from samserve.security.tls import client_channel
from samserve_dev import local_stack
from samserve_dev.images import synthetic_image

TARGET_BYTES = 1_000_000_000


def jpeg(height: int, width: int, seed: int) -> bytes:
    """A smooth synthetic scene at ``height`` x ``width`` (drawn small, then resized: cheap at 64 MP)."""
    small = synthetic_image(max(1, height // 8), max(1, width // 8), seed)
    buffer = io.BytesIO()
    Image.fromarray(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)).save(buffer, "JPEG",
                                                                                               quality=90)
    return buffer.getvalue()


def clicks(count: int, height: int, width: int, seed: int) -> list[pb.Prompt]:
    rng = np.random.default_rng(seed)
    return [pb.Prompt(points=[pb.Point(x=float(x), y=float(y), label=pb.POINT_LABEL_FOREGROUND)],
                      multimask_output=True)
            for x, y in zip(rng.uniform(0, width, count), rng.uniform(0, height, count), strict=True)]


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclasses.dataclass
class Case:
    name: str
    call: Callable[[pb_grpc.SegmentAnythingStub], object]
    what: str


def measure(pid: int, stub: pb_grpc.SegmentAnythingStub, case: Case) -> dict[str, object]:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    before = memory_kib(pid, "VmRSS")
    started = time.perf_counter()
    code, message, size = "OK", "", 0
    try:
        size = case.call(stub).ByteSize()  # type: ignore[attr-defined]
    except grpc.RpcError as error:
        code, message = error.code().name, error.details()
    seconds = time.perf_counter() - started
    peak, after = memory_kib(pid, "VmHWM"), memory_kib(pid, "VmRSS")
    growth = (peak - before) * 1024
    return {"case": case.name, "request": case.what, "code": code, "message": message, "seconds": round(seconds, 2),
            "response_bytes": size, "rss_before_bytes": before * 1024, "peak_growth_bytes": growth,
            "rss_after_bytes": after * 1024, "returned_fraction": round(1 - (after - before) * 1024 / growth, 3)
            if growth > 0 else None, "target_met": code == "OK" and growth <= TARGET_BYTES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_argument(parser)
    args = parser.parse_args()
    defaults = GatewaySettings()
    model = scenes_model()
    photo, logits_photo, big, big_embed = jpeg(3000, 4000, 1), jpeg(3000, 4000, 2), jpeg(8000, 8000, 3), \
        jpeg(8000, 8000, 4)
    both = pb.MASK_ENCODING_RLE_AND_PNG
    cases = [
        Case("segment_256_prompts_12mp",
             lambda s: s.Segment(pb.SegmentRequest(image_bytes=photo, prompts=clicks(256, 3000, 4000, 0),
                                                   mask_encoding=both), timeout=900),
             "Segment, 256 one-point prompts, multimask, RLE+PNG, 3000x4000 JPEG bytes"),
        Case("segment_256_prompts_12mp_logits",
             lambda s: s.Segment(pb.SegmentRequest(image_bytes=logits_photo, prompts=clicks(256, 3000, 4000, 1),
                                                   mask_encoding=both, return_low_res_logits=True), timeout=900),
             "the same on another image, with low-res logits returned"),
        Case("segment_16_prompts_64mp",
             lambda s: s.Segment(pb.SegmentRequest(image_bytes=big, prompts=clicks(16, 8000, 8000, 2),
                                                   mask_encoding=both), timeout=900),
             "Segment, 16 one-point prompts, multimask, RLE+PNG, 8000x8000 JPEG bytes"),
        Case("embed_64mp", lambda s: s.Embed(pb.EmbedRequest(image=big_embed), timeout=900),
             "Embed of an 8000x8000 JPEG"),
        Case("generate_masks_12mp",
             lambda s: s.GenerateMasks(pb.GenerateMasksRequest(
                 image_bytes=photo, mask_encoding=pb.MASK_ENCODING_RLE, **CARD_THRESHOLDS), timeout=900),
             f"GenerateMasks, 32 points per side, thresholds {CARD_THRESHOLDS}, 3000x4000 JPEG (embedding cached)"),
    ]
    work = WORK / "request_memory_cpu"
    with local_stack.serve_locally(model.directory, work) as triton, \
            local_stack.GatewayProcess(triton.grpc_url, None, work) as gateway, \
            client_channel(gateway.target, options=[("grpc.max_receive_message_length", 1 << 30)]) as channel:
        assert gateway.process is not None
        stub = pb_grpc.SegmentAnythingStub(channel)
        stub.Segment(pb.SegmentRequest(image_bytes=jpeg(480, 640, 9), prompts=clicks(2, 480, 640, 9)), timeout=300)
        rows = []
        for case in cases:
            print(f"{case.name} ...", flush=True)
            rows.append(measure(gateway.process.pid, stub, case))
            print(f"  {rows[-1]}", flush=True)
    print_table("Gateway memory per request (peak RSS growth)", ["case", "code", "s", "growth MB", "after - before MB",
                                                                 "<= 1 GB"],
                [[r["case"], r["code"], r["seconds"], round(r["peak_growth_bytes"] / 1e6),
                  round((r["rss_after_bytes"] - r["rss_before_bytes"]) / 1e6), r["target_met"]] for r in rows])
    write_results("request_memory_cpu.json", {
        "environment": environment(),
        "model": {"name": model.variant, "weights": model.weights},
        "limits": {"max_prompts": defaults.max_prompts, "max_image_pixels": defaults.max_image_pixels,
                   "max_response_bytes": defaults.max_response_bytes,
                   "max_decoding_pixels": defaults.max_decoding_pixels},
        "target": "peak RSS growth of the gateway <= 1 GB for any request within the default limits",
        "cases": rows,
        "all_targets_met": all(r["target_met"] for r in rows),
    }, args.out)


if __name__ == "__main__":
    main()
