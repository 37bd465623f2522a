"""The gpu-torch runtime's changes to the official modules (tests/integration/test_gpu_torch.py serves it through
Triton; bench/gpu.py measures it): scaled-dot-product attention computes the official attention, and the benchmark
that a GPU machine runs works end to end on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from samserve_build import architectures
from samserve_build.torch_runtime import use_sdpa

ROOT = Path(__file__).resolve().parents[2]


@torch.no_grad()
def test_sdpa_attention_computes_the_official_attention():
    arch = architectures.ARCHITECTURES["tiny"]
    state = architectures.random_state_dict(arch, 0)
    official, fused = architectures.build_sam(arch), architectures.build_sam(arch)
    official.load_state_dict(state)
    fused.load_state_dict(state)
    assert use_sdpa(fused.image_encoder) == arch.encoder_depth
    x = torch.randn(2, 3, arch.image_size, arch.image_size, generator=torch.Generator().manual_seed(0))
    expected = official.image_encoder(x)
    got = fused.image_encoder(x)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


def test_the_gpu_benchmark_runs_on_the_cpu(tmp_path):
    """bench/gpu.py --device cpu (tiny model): every part runs and writes its figures; masks are compared, never
    0 against 0, and the fp32 runtime equals the official code."""
    subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--repeats", "2",
                    "--points-per-side", "8", "--iou-images", "2", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   capture_output=True)
    result = json.loads((tmp_path / "gpu_cpu.json").read_text())
    assert result["environment"]["device"] == {"kind": "cpu"} and result["met"] == {"applicable": False}
    assert [row["batch"] for row in result["encoder"]] == [1, 8, 32]
    assert all(row[side]["images_per_s"] > 0 for row in result["encoder"] for side in ("official", "ours"))
    assert [row["prompts"] for row in result["decoder"]] == [1, 64]
    everything = result["segment_everything"]
    assert everything["official_masks"] > 0 and everything["ours_masks"] > 0 and everything["speedup"] > 0
    masks = result["masks"]
    assert masks["vs_ours_fp32"]["n"] >= 16 and masks["ours_fp32_vs_official_fp32"]["min"] >= 0.999
    assert masks["vs_ours_fp32"]["median"] >= 0.98  # bf16 autocast on the tiny random model
    assert np.isfinite(result["seconds"])
