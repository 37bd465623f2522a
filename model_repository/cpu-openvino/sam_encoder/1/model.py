"""Triton python-backend entry point for the SAM encoder (CPU targets); the logic lives in samserve.triton_backend."""

from samserve.triton_backend import EncoderModel as TritonPythonModel  # noqa: F401
