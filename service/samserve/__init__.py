"""samserve: Segment Anything as a high-throughput inference service."""

__version__ = "0.1.0"
