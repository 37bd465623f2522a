"""Triton python-backend entry point for the SAM decoder (CPU target); the logic lives in samserve.backends.python_model."""

from samserve.backends.python_model import DecoderModel as TritonPythonModel  # noqa: F401
