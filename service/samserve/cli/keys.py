"""``samserve keys add | list | revoke | limit``: edit the API keys file (replaced atomically; a running gateway
re-reads it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from samserve.core.settings import GatewaySettings
from samserve.security import key_file
from samserve.security.quotas import TenantLimits


def keys_command(settings: GatewaySettings, args: argparse.Namespace) -> int:
    """``samserve keys add | list | revoke``: edit the API keys file (replaced atomically; a running gateway
    re-reads it)."""
    path = args.file or settings.api_keys_file
    if path is None:
        print("samserve keys: give --file or set SAMSERVE_API_KEYS_FILE", file=sys.stderr)
        return 2
    try:
        if args.action == "add":
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            entry, token = key_file.add_key(path, args.tenant, methods)
            print(f"added key {entry.id} for tenant {entry.tenant} ({', '.join(entry.methods)}) to {path}; "
                  "the token below is shown only now:", file=sys.stderr)
            print(token)
        elif args.action == "list":
            document = key_file.read_key_file(path)
            for key in document.keys:
                print(f"{key.id}\t{key.tenant}\t{','.join(key.methods)}\t{key.created or '-'}")
            for tenant, limits in [("(default)", document.default_limits), *document.tenants.items()]:
                print(f"limits\t{tenant}\t{limits.model_dump_json(exclude_none=True)}")
        elif args.action == "limit":
            limits = TenantLimits(**{name: getattr(args, name) for name in TenantLimits.model_fields
                                     if getattr(args, name) is not None})
            key_file.set_limits(path, None if args.default else args.tenant, limits)
            print(f"limits of {'every other tenant' if args.default else args.tenant} in {path}: "
                  f"{limits.model_dump_json(exclude_none=True)}", file=sys.stderr)
        else:
            removed = key_file.revoke_key(path, args.key_id)
            print(f"revoked key {removed.id} of tenant {removed.tenant} in {path}", file=sys.stderr)
    except (key_file.KeyFileError, ValidationError) as error:
        print(f"samserve keys: {error}", file=sys.stderr)
        return 1
    except KeyError:
        print(f"samserve keys: no key {args.key_id} in {path}", file=sys.stderr)
        return 1
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``keys`` and its actions to the ``samserve`` parser."""
    p_keys = commands.add_parser("keys", help="add, list or revoke API keys in a keys file")
    p_keys.set_defaults(run=keys_command, settings=GatewaySettings)
    key_actions = p_keys.add_subparsers(dest="action", required=True)
    p_add = key_actions.add_parser("add", help="add a key for a tenant and print its token (once)")
    p_add.add_argument("--tenant", required=True)
    p_add.add_argument("--methods", default="*", help="RPCs it may call, comma-separated (default '*': all)")
    p_list = key_actions.add_parser("list", help="ids, tenants and RPCs (never tokens)")
    p_revoke = key_actions.add_parser("revoke", help="remove a key (a running gateway stops accepting it)")
    p_revoke.add_argument("key_id")
    p_limit = key_actions.add_parser("limit", help="set a tenant's quotas (unset ones: unlimited); none: remove")
    who = p_limit.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant")
    who.add_argument("--default", action="store_true", help="the limits of tenants without their own")
    for name, field in TenantLimits.model_fields.items():
        rate = name.endswith(("_per_s", "_per_min"))
        p_limit.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float if rate else int,
                             help=field.description or "bucket size (default: one period of the rate)")
    for p_action in (p_add, p_list, p_revoke, p_limit):
        p_action.add_argument("--file", type=Path, default=None, help="keys file (default SAMSERVE_API_KEYS_FILE)")
