"""The ``samserve`` command: the local stack, key administration and client commands."""
