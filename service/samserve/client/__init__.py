"""The typed Python client of the gateway (:class:`SamServeClient`) and the bulk GenerateMasks job."""

from samserve.client.typed_client import PromptSpec, SamServeClient

__all__ = ["PromptSpec", "SamServeClient"]
