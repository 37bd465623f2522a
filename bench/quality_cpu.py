"""Mask quality of the shipped model: the official ``SamPredictor`` on held-out generated scenes.

The same table as ``samserve-build evaluate`` (``samserve_build.evaluation.write_quality_table``: 1 point top-ranked
and oracle, tight box, 3 interactive points, predicted-IoU calibration, by object size) for the shipped checkpoint,
with the run's provenance (commit, command, CPU) added. Writes bench/results/tiny_quality.json (about 4 minutes for
500 scenes on 2 cores). Through the service the same evaluation gives the same figures:
tests/integration/test_quality.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import add_output_argument, environment, write_results
from samserve_build import evaluation
from samserve_build.settings import SCENES_CHECKPOINT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=SCENES_CHECKPOINT, help="model.pth, model.json beside it")
    parser.add_argument("--scenes", type=int, default=500, help="held-out scenes 0..N-1")
    add_output_argument(parser)
    args = parser.parse_args()
    table = evaluation.write_quality_table(args.checkpoint, args.scenes, out=None)
    write_results("tiny_quality.json", {"benchmark": "bench/quality_cpu.py", "environment": environment(), **table},
                  args.out)


if __name__ == "__main__":
    main()
