"""Several ``samserve-build prepare`` processes on one workdir at once (the init containers of several pods on one
shared volume): one exports and renders, the others wait for it and find the work done; one whole repository
results and no staging folder is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from samserve.backends import onnx_runner
from samserve.core import model_spec
from samserve_build import repository, workdir
from samserve_build.cli import PREPARE_LOCK
from samserve_build.targets import SERVING_TARGETS, ServingTargetName
from samserve_dev.polling import wait_until

LEFTOVER_MARKERS = (".staging-", ".partial", ".link-", ".old-")


def test_two_prepares_at_once_export_once_and_leave_one_whole_repository(tmp_path):
    work, logs = tmp_path / "work", tmp_path / "logs"
    logs.mkdir()
    env = dict(os.environ, SAMSERVE_WORKDIR=str(work), SAMSERVE_MODEL_VARIANT="tiny", SAMSERVE_RANDOM_SEED="3",
               SAMSERVE_TARGET=str(ServingTargetName.CPU_ONNXRUNTIME))
    command = [str(Path(sys.executable).with_name("samserve-build")), "prepare"]
    outputs = [(logs / f"prepare-{i}.out", logs / f"prepare-{i}.err") for i in range(2)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # Both start while this test holds the lock, so both are at the lock when it is released: they race for it,
        # and the loser waits through the winner's whole export and render.
        with workdir.exclusive_lock(work / PREPARE_LOCK, "test"):
            for out, err in outputs:
                with open(out, "wb") as stdout, open(err, "wb") as stderr:
                    processes.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr))
            wait_until(lambda: [err.read_text() for _, err in outputs],
                       lambda texts: all("waiting for it to finish" in text for text in texts),
                       "both prepares waiting for the workdir's lock", timeout_s=180, interval_s=0.2)
        codes = [process.wait(timeout=600) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    errs = [err.read_text() for _, err in outputs]
    assert codes == [0, 0], errs

    exported = [text for text in errs if "exporting encoder" in text]
    skipped = [text for text in errs if "already exported" in text]
    assert len(exported) == 1 and len(skipped) == 1, errs  # the export ran once
    assert "already serves this content" in skipped[0]  # and the repository was not replaced under its readers
    repo = work / "repository"
    assert {out.read_text().strip() for out, _ in outputs} == {str(repo)}

    # One whole repository: the link, one version, every config valid, every model file in place and loadable.
    assert repo.is_symlink()
    (version,) = workdir.versions(repo)
    assert (repo.parent / os.readlink(repo)) == version
    meta = model_spec.ModelMetadata.read(work / "models" / "tiny-random-seed3")
    serving = SERVING_TARGETS[ServingTargetName.CPU_ONNXRUNTIME]
    for model_name, model_file in serving.model_files.items():
        config = repository.parse_config((repo / model_name / "config.pbtxt").read_text())
        assert config.max_batch_size > 0
        assert model_spec.ModelMetadata.from_json(
            config.parameters[model_spec.METADATA_PARAMETER].string_value).weights_sha256 == meta.weights_sha256
        onnx_runner.create_session(repo / model_name / "1" / model_file)
    recorded = (version / repository.RENDER_MANIFEST).read_text()
    assert repository.render_manifest(version) == json.loads(recorded)  # nothing changed or missing since

    leftovers = [path for path in work.rglob("*") if any(marker in path.name for marker in LEFTOVER_MARKERS)]
    assert not leftovers, leftovers
