"""Triton python-backend entry point for the SAM decoder (CPU targets); the logic lives in samserve.triton_backend."""

from samserve.triton_backend import DecoderModel as TritonPythonModel  # noqa: F401
