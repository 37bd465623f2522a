"""The serving runtimes import without the exporter's dependencies: the GPU Triton image installs the wheel's ``gpu``
extra (PyTorch, segment-anything), ONNX Runtime and OpenVINO, but not ``onnx``. Each model's runtime module
(``samserve.backends.python_model.RUNTIMES``) must import there, so each check runs in a fresh interpreter in which
``import onnx`` fails as it does in that image (this tier itself never imports torch)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_ONNX = "import sys\nsys.modules['onnx'] = None  # as absent: `import onnx` (and onnx.*) raises ImportError\n"


def _run(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_ONNX + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=300)


def test_every_runtime_module_imports_without_onnx():
    result = _run("""
        import importlib
        from samserve.backends.python_model import RUNTIMES

        modules = ["samserve_build.graphs", "samserve_build.torch_runtime"]
        for entry in RUNTIMES.values():
            module, function = entry.split(":")
            getattr(importlib.import_module(module), function)  # the factory Triton's model calls
            modules.append(module)
        loaded = sorted(name for name, module in sys.modules.items()
                        if module is not None and (name == "onnx" or name.startswith("onnx.")))
        assert not loaded, loaded
        print(" ".join(modules))
    """)
    assert result.returncode == 0, result.stderr
    assert "samserve_build.torch_runtime" in result.stdout.split()


def test_the_blocker_catches_a_module_that_needs_onnx():
    """The check above can fail: the exporter does import onnx, and under the blocker it cannot."""
    result = _run("import samserve_build.export\n")
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr
    assert "onnx" in result.stderr
