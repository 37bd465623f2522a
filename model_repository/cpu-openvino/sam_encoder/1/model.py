"""Triton python-backend entry point for the SAM encoder (CPU targets); the logic lives in samserve.backends.python_model."""

from samserve.backends.python_model import EncoderModel as TritonPythonModel  # noqa: F401
