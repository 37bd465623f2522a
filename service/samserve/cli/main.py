"""``samserve``: run the stack, or segment an image through it.

    samserve up                      # Redis (when installed) + Triton + gateway, in the foreground
    samserve gateway                 # the gateway alone (Triton and Redis elsewhere; one per replica)
    samserve segment photo.jpg --point 500,375 --out overlay.png
    samserve generate-masks photos/ --out masks/   # segment everything, one JSON per image, resumable
    samserve keys add --tenant acme --file keys.json   # a new API key (the token is printed once)
    samserve labelstudio             # Label Studio's ML backend, in front of the gateway (docs/labelstudio.md)

Client commands take TLS and the API key from flags or SAMSERVE_CLIENT_* (docs/security.md).
"""


from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from samserve.cli import client_commands, keys, labelstudio, serve
from samserve.transport.call_context import RequestIdLogFilter

COMMAND_MODULES = (serve, keys, client_commands, labelstudio)
"""Each adds its commands to the parser (``register``), with the function that runs each (``run``) and the
settings class it reads (``settings``)."""


def configure_logging(level: str) -> None:
    """One log format for every process; each record carries the id of the RPC it belongs to and its caller's
    tenant (``-`` if none)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s %(tenant)s]: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="samserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    args = parser.parse_args(argv)
    if args.command == "segment" and not args.point and not args.box:
        parser.error("segment needs --point and/or --box")
    try:  # validated here: a bad SAMSERVE_* value stops the command before anything starts
        settings = args.settings()
    except ValidationError as error:
        parser.error(f"invalid SAMSERVE_* settings:\n{error}")
    configure_logging(settings.log_level.value)
    return int(args.run(settings, args))


if __name__ == "__main__":
    sys.exit(main())
