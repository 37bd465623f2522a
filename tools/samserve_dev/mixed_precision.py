"""The vit_b images and prompts of the mixed-precision gate, and export folders to write mixed graphs beside
(tests/integration/test_mixed_precision.py and bench/precision_cpu.py use the same)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from samserve.vision import processing
from samserve_build.graph_quality import agreement_prompts
from samserve_dev.images import synthetic_image

VIT_B_IMAGES = ((480, 640, 11),)
"""(height, width, seed) of the synthetic images of the vit_b gate: one, as each vit_b encoder run takes seconds here
(44 prompts on it)."""


def vit_b_inputs() -> tuple[list[np.ndarray], list[list[processing.Prompt]]]:
    """The images and prompts of the vit_b gate (bench/precision_cpu.py measures the same)."""
    images = [synthetic_image(height, width, seed) for height, width, seed in VIT_B_IMAGES]
    return images, [agreement_prompts(height, width, seed) for height, width, seed in VIT_B_IMAGES]


def linked_export(model_dir: Path, target: Path) -> Path:
    """The fp32 graphs and metadata of an export folder hard-linked (else copied) into ``target``, so the mixed
    graphs are written beside them without touching the session's shared export."""
    target.mkdir(parents=True, exist_ok=True)
    for source in Path(model_dir).iterdir():
        if source.is_file():
            try:
                os.link(source, target / source.name)
            except OSError:
                shutil.copy2(source, target / source.name)
    return target
