"""Triton python-backend entry point for the SAM decoder (python-backend targets); the logic lives in samserve.backends.python_model."""

from samserve.backends.python_model import DecoderModel as TritonPythonModel  # noqa: F401
