"""Triton python-backend entry point for the SAM encoder (python-backend targets); the logic lives in samserve.backends.python_model."""

from samserve.backends.python_model import EncoderModel as TritonPythonModel  # noqa: F401
