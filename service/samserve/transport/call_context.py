"""The context of the RPC being served: its request id and its caller's tenant, in context variables that every
log record of the call carries (:class:`RequestIdLogFilter`)."""

from __future__ import annotations

import contextvars
import logging
import re

REQUEST_ID_HEADER = "x-request-id"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""A request id the client may choose; any other is replaced by a new one."""

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("samserve_request_id", default="-")
"""The id of the RPC being served (``-`` outside an RPC)."""
tenant: contextvars.ContextVar[str] = contextvars.ContextVar("samserve_tenant", default="-")
"""The tenant of the API key the RPC is served for (``-`` outside an RPC or with auth off)."""


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` and ``tenant`` to every record (``-`` outside an RPC), for a ``%(request_id)s``
    ``%(tenant)s`` log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.tenant = tenant.get()
        return True
