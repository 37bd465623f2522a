"""Export cost and export accuracy: ``samserve-build export`` of seeded random vit_b and ViT-H weights on this CPU.

Each variant is exported in its own child process (exactly what ``samserve-build export --variant V
--random-weights --seed 0`` does: Meta-format checkpoint written first, then both graphs traced, saved and checked
against PyTorch on fresh random inputs). Per variant the JSON records the wall-clock time of the child, the export's
own time (``ExportResult.seconds``: load + trace + save + both checks), the child's peak resident memory
(``ru_maxrss`` of that child alone, from ``os.wait4``), the size of every file written and the worst relative
error of each graph against PyTorch (the export fails at 1e-4). ViT-H is the one whose encoder (2.5 GB of weights)
goes through ONNX external data, and the one that needs about 18 GB of memory: run it on an otherwise idle machine.

Writes bench/results/export_cpu.json (``--variants`` and ``--out DIR`` for other runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO_ROOT, WORK, add_output_argument, environment, print_table, write_results

VARIANTS = ("vit_b", "vit_h")
SEED = 0


def worker(variant: str, out_dir: Path) -> None:
    """The child: export seeded random weights of ``variant`` into ``out_dir``, print the result as JSON."""
    from samserve_build import export

    result = export.export_random_weights(variant, SEED, out_dir)
    print(json.dumps({"export_s": result.seconds, "encoder_relative_error": result.encoder_error,
                      "decoder_relative_error": result.decoder_error, "model_id": result.metadata.model_id}))


def measure(variant: str) -> dict[str, object]:
    """Export ``variant`` in a child process; its time, peak memory, files and errors (the files are removed after)."""
    out_dir = WORK / "export" / variant
    command = [sys.executable, "-m", "bench.export_cpu", "--worker", variant, "--worker-out", str(out_dir)]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall_s = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"export of {variant} failed (exit {child.returncode}); see its log above")
    record = json.loads(output.strip().splitlines()[-1])
    checkpoint_dir = out_dir.with_name(out_dir.name + "-checkpoint")
    files = {path.name: path.stat().st_size for path in sorted(out_dir.iterdir()) if path.is_file()}
    shutil.rmtree(out_dir)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    print(f"{variant}: {wall_s:.1f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB, errors "
          f"{record['encoder_relative_error']:.2e} / {record['decoder_relative_error']:.2e}", flush=True)
    return {"wall_clock_s": wall_s, **record, "peak_rss_bytes": usage.ru_maxrss * 1024, "files_bytes": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    add_output_argument(parser)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.worker_out)
        return
    variants = {variant: measure(variant) for variant in args.variants}
    print_table("samserve-build export, seeded random weights", [
        "variant", "wall s", "export s", "peak RSS GiB", "encoder error", "decoder error", "largest file MiB"],
        [[name, v["wall_clock_s"], v["export_s"], v["peak_rss_bytes"] / 2**30, f"{v['encoder_relative_error']:.2e}",
          f"{v['decoder_relative_error']:.2e}", f"{max(v['files_bytes'].values()) / 2**20:.0f}"]
         for name, v in variants.items()])
    write_results("export_cpu.json", {
        "benchmark": "bench/export_cpu.py",
        "environment": environment(),
        "what": "samserve-build export of seeded random weights (seed 0), one child process per variant",
        "relative_error_limit": 1e-4,
        "variants": variants,
    }, args.out)


if __name__ == "__main__":
    main()
