"""Typed domain errors: what went wrong, in the service's terms.

They carry no transport detail: :mod:`samserve.transport.interceptors` holds the ONE table that maps them (and
timeouts) to
gRPC status codes, and the Triton client (:mod:`samserve.triton.models`) turns Triton's failures into them at its
boundary.
"""

from __future__ import annotations


class SamServeError(Exception):
    """Base of the errors a client sees (an unmapped subclass is INTERNAL)."""


class InvalidArgument(SamServeError):
    """The request is wrong. ``field`` names the request field at fault (``prompts[2].box``), when there is one:
    it becomes a ``google.rpc.BadRequest`` field violation in the status details."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(SamServeError):
    """A referenced thing (an image id) is unknown or expired."""


class ResourceExhausted(SamServeError):
    """Too much work waiting, a quota spent, or a request over a cost limit: retry later, or send less.

    ``retry_after_s``: when a retry may succeed (None: not known, or never for this request); ``quota``: what ran
    out (``tenant:acme/encodes``) or the setting the request exceeds, for a ``google.rpc.QuotaFailure``."""

    def __init__(self, message: str, retry_after_s: float | None = None, quota: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.quota = quota


class Unavailable(SamServeError):
    """The models are not ready or Triton cannot be reached: retry."""


class DeadlineExceeded(SamServeError):
    """The call's deadline passed before the work finished."""


class Internal(SamServeError):
    """A failure inside the service (a model runtime error, a broken invariant)."""


class Unauthenticated(SamServeError):
    """No credentials, malformed ones, or an unknown API key."""


class PermissionDenied(SamServeError):
    """The caller is known, but its tenant may not call this RPC."""
