"""``samserve``: run the stack, or segment an image through it.

    samserve up                      # Redis (when installed) + Triton + gateway, in the foreground
    samserve gateway                 # the gateway alone (Triton and Redis elsewhere; one per replica)
    samserve segment photo.jpg --point 500,375 --out overlay.png
    samserve generate-masks photos/ --out masks/   # segment everything, one JSON per image, resumable
    samserve keys add --tenant acme --file keys.json   # a new API key (the token is printed once)

Client commands take TLS and the API key from flags or SAMSERVE_CLIENT_* (README "Security").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError

from samserve import model_spec
from samserve.quotas import TenantLimits
from samserve.settings import ClientSettings, GatewaySettings, StackSettings

if TYPE_CHECKING:
    from samserve.client import SamServeClient
    from samserve.security import Security

LOG = logging.getLogger("samserve")


def _security(settings: GatewaySettings) -> Security | None:
    """The checked security settings, or None after logging why they are unusable."""
    from samserve.security import SecurityConfigError, load_security

    try:
        return load_security(settings)
    except SecurityConfigError as error:
        LOG.error("invalid security settings: %s", error)
        return None


async def _serve_until_signal(settings: GatewaySettings, security: Security, watch: object | None = None) -> None:
    """Run the gateway until SIGINT/SIGTERM (or until the watched subprocess exits)."""
    from samserve.server import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def watch_process() -> None:
        while watch is not None and watch.poll() is None:  # type: ignore[attr-defined]
            await asyncio.sleep(1.0)
        if watch is not None:
            LOG.error("tritonserver exited with %s", watch.returncode)  # type: ignore[attr-defined]
            stop.set()

    watcher = asyncio.create_task(watch_process())
    try:
        await serve(settings, stop, security)
    finally:
        watcher.cancel()


def up(settings: StackSettings) -> int:
    """Redis (if Debian's redis-server is installed and no SAMSERVE_REDIS_URL is set), Triton, gateway."""
    from samserve.redis_server import RedisServer, RedisStartError, redis_binary
    from samserve.triton_server import TritonServer, TritonStartError

    repository = settings.repository
    if not (repository / model_spec.ENCODER_MODEL / "config.pbtxt").exists():
        LOG.error("no model repository at %s: run `samserve-build prepare` (or `make up`) first", repository)
        return 2
    security = _security(settings)
    if security is None:
        return 2
    decoder_dir = repository / model_spec.DECODER_MODEL / "1"
    if settings.client_decoder_dir is None and (decoder_dir / model_spec.DECODER_FILE).exists():
        settings = settings.model_copy(update={"client_decoder_dir": decoder_dir})  # browsers decode with it
    redis = None
    if settings.redis_url is None and redis_binary() is not None:
        try:
            redis = RedisServer(settings.redis_server_port, settings.workdir / "redis").start()
        except RedisStartError as error:
            LOG.error("%s", error)
            return 1
        settings = settings.model_copy(update={"redis_url": redis.url})
        LOG.info("redis-server on %s (embedding cache tier 2)", redis.url)
    triton = TritonServer(
        repository=repository, workdir=settings.workdir, http_port=settings.triton_http_port,
        grpc_port=settings.triton_grpc_port, metrics_port=settings.triton_metrics_port,
        host=settings.triton_host, log_verbose=settings.triton_log_verbose,
    )
    try:
        triton.start()
        triton.wait_ready(settings.triton_start_timeout_s, (model_spec.ENCODER_MODEL, model_spec.DECODER_MODEL))
        LOG.info("Triton ready on %s (log %s); starting the gateway on %s:%d; Ctrl-C stops everything",
                 triton.grpc_url, triton.log_path, settings.gateway_host, settings.gateway_port)
        asyncio.run(_serve_until_signal(settings, security, triton.process))
    except TritonStartError as error:
        LOG.error("%s", error)
        return 1
    finally:
        LOG.info("stopping")
        triton.stop()
        if redis is not None:
            redis.stop()
    return 0


def _client(args: argparse.Namespace) -> SamServeClient:
    """A client of ``args.target`` with the TLS and token flags over SAMSERVE_CLIENT_* (``args.client``)."""
    from samserve.client import SamServeClient

    given = {name: getattr(args, name) for name in ("tls", "ca_file", "cert_file", "key_file", "server_name")}
    update = {name: value for name, value in given.items() if value}
    if args.token_file:
        update["token"] = Path(args.token_file).read_text().strip()
    return SamServeClient(args.target, security=args.client.model_copy(update=update))


def segment_command(args: argparse.Namespace) -> int:
    """Segment an image through the gateway; print the masks and write an overlay PNG."""
    from samserve.client import FOREGROUND, PromptSpec
    from samserve.images import decode_image
    from samserve.overlay import draw_overlay

    data = Path(args.image).read_bytes()
    points, labels = [], []
    for text in args.point or []:
        parts = [float(v) for v in text.split(",")]
        points.append((parts[0], parts[1]))
        labels.append(int(parts[2]) if len(parts) > 2 else FOREGROUND)
    box = None
    if args.box:
        x0, y0, x1, y1 = (float(v) for v in args.box.split(","))
        box = (x0, y0, x1, y1)
    prompt = PromptSpec(points=points, labels=labels, box=box, multimask_output=not args.single)
    with _client(args) as client:
        embedded = client.embed(data)
        (answer,) = client.segment(embedded.image_id, [prompt])
    print(f"image {embedded.image_id[:16]}... {embedded.width}x{embedded.height}, model {embedded.model_id}, "
          f"cached={embedded.cached}")
    for k, token in enumerate(answer.token_index):
        print(f"mask token {token}: predicted IoU {answer.predicted_iou[k]:.3f}, stability "
              f"{answer.stability_score[k]:.3f}, area {int(answer.masks[k].sum())} px")
    if args.out:
        best = int(np.argmax(answer.predicted_iou))
        image = decode_image(data, max_pixels=1 << 31)
        overlay = draw_overlay(image, answer.masks[best], points, [label == FOREGROUND for label in labels], box)
        Path(args.out).write_bytes(overlay)
        print(f"wrote {args.out} (mask token {answer.token_index[best]}, the highest predicted IoU)")
    return 0


def generate_masks_command(args: argparse.Namespace) -> int:
    """The bulk job (samserve.bulk): exit 0 when every image has its JSON, 1 when some failed."""
    from samserve import amg, bulk

    root, images = bulk.list_images(args.input)
    params = bulk.params_from_args(vars(args), amg.SCALAR_PARAMETERS)
    with _client(args) as client:
        report = bulk.run_bulk(images, root, args.out, client, params, concurrency=args.concurrency,
                               retry_failed=args.retry_failed, progress=not args.quiet, timeout_s=args.timeout)
    print(report.summary())
    return 1 if report.failures else 0


def keys_command(settings: GatewaySettings, args: argparse.Namespace) -> int:
    """``samserve keys add | list | revoke``: edit the API keys file (replaced atomically; a running gateway
    re-reads it)."""
    from samserve import api_keys

    path = args.file or settings.api_keys_file
    if path is None:
        print("samserve keys: give --file or set SAMSERVE_API_KEYS_FILE", file=sys.stderr)
        return 2
    try:
        if args.action == "add":
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            entry, token = api_keys.add_key(path, args.tenant, methods)
            print(f"added key {entry.id} for tenant {entry.tenant} ({', '.join(entry.methods)}) to {path}; "
                  "the token below is shown only now:", file=sys.stderr)
            print(token)
        elif args.action == "list":
            document = api_keys.read_key_file(path)
            for key in document.keys:
                print(f"{key.id}\t{key.tenant}\t{','.join(key.methods)}\t{key.created or '-'}")
            for tenant, limits in [("(default)", document.default_limits), *document.tenants.items()]:
                print(f"limits\t{tenant}\t{limits.model_dump_json(exclude_none=True)}")
        elif args.action == "limit":
            limits = TenantLimits(**{name: getattr(args, name) for name in TenantLimits.model_fields
                                     if getattr(args, name) is not None})
            api_keys.set_limits(path, None if args.default else args.tenant, limits)
            print(f"limits of {'every other tenant' if args.default else args.tenant} in {path}: "
                  f"{limits.model_dump_json(exclude_none=True)}", file=sys.stderr)
        else:
            removed = api_keys.revoke_key(path, args.key_id)
            print(f"revoked key {removed.id} of tenant {removed.tenant} in {path}", file=sys.stderr)
    except (api_keys.KeyFileError, ValidationError) as error:
        print(f"samserve keys: {error}", file=sys.stderr)
        return 1
    except KeyError:
        print(f"samserve keys: no key {args.key_id} in {path}", file=sys.stderr)
        return 1
    return 0


def _client_options() -> argparse.ArgumentParser:
    """The flags of the client commands: the gateway address, TLS and the API key (over SAMSERVE_CLIENT_*)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--target", default=None, help="gateway address (default from SAMSERVE_GATEWAY_*)")
    options.add_argument("--tls", action="store_true", help="TLS (system CAs unless --tls-ca) [SAMSERVE_CLIENT_TLS]")
    options.add_argument("--tls-ca", dest="ca_file", type=Path, help="CA of the gateway's certificate "
                         "[SAMSERVE_CLIENT_CA_FILE]")
    options.add_argument("--tls-cert", dest="cert_file", type=Path, help="client certificate, mutual TLS "
                         "[SAMSERVE_CLIENT_CERT_FILE]")
    options.add_argument("--tls-key", dest="key_file", type=Path, help="its key [SAMSERVE_CLIENT_KEY_FILE]")
    options.add_argument("--tls-server-name", dest="server_name", help="name the gateway's certificate must "
                         "carry, when not the target's host [SAMSERVE_CLIENT_SERVER_NAME]")
    options.add_argument("--token-file", help="file holding the API key [SAMSERVE_CLIENT_TOKEN holds the key "
                         "itself]")
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="samserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run Redis + Triton + gateway in the foreground")
    commands.add_parser("gateway", help="run the gateway alone (SAMSERVE_TRITON_*, SAMSERVE_REDIS_URL)")
    p_keys = commands.add_parser("keys", help="add, list or revoke API keys in a keys file")
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
    client_options = _client_options()
    p_segment = commands.add_parser("segment", parents=[client_options],
                                    help="segment an image through a running gateway")
    p_segment.add_argument("image", type=Path)
    p_segment.add_argument("--point", action="append", help="x,y[,label] in image pixels; label 1 fg (default), 0 bg")
    p_segment.add_argument("--box", help="x0,y0,x1,y1 in image pixels")
    p_segment.add_argument("--single", action="store_true", help="single-mask output instead of 3 masks")
    p_segment.add_argument("--out", help="write an overlay PNG of the best mask and the prompt")
    p_bulk = commands.add_parser("generate-masks", parents=[client_options],
                                 help="segment everything in a folder or list of images")
    p_bulk.add_argument("input", type=Path, help="a folder (searched recursively) or a text file of image paths")
    p_bulk.add_argument("--out", type=Path, required=True, help="folder for one JSON per image (+ failures.json)")
    p_bulk.add_argument("--concurrency", type=int, default=4, help="images in flight (default 4)")
    p_bulk.add_argument("--retry-failed", action="store_true", help="also retry images rejected as invalid before")
    p_bulk.add_argument("--timeout", type=float, default=None, help="seconds per image (default: the client's 600)")
    p_bulk.add_argument("--quiet", action="store_true", help="no progress bar")
    from samserve.amg import SCALAR_PARAMETERS, AmgParams

    for name in SCALAR_PARAMETERS:
        default = getattr(AmgParams(), name)
        p_bulk.add_argument("--" + name.replace("_", "-"), type=float if isinstance(default, float) else int,
                            default=None, help=f"official default {default:g}")
    args = parser.parse_args(argv)
    try:  # validated here: a bad SAMSERVE_* value stops the command before anything starts
        settings = SETTINGS[args.command]()
        if args.command in ("segment", "generate-masks"):
            args.client = ClientSettings()
    except ValidationError as error:
        parser.error(f"invalid SAMSERVE_* settings:\n{error}")
    configure_logging(settings.log_level.value)
    if args.command in ("segment", "generate-masks"):
        args.target = args.target or settings.gateway_target
    if args.command == "segment" and not args.point and not args.box:
        parser.error("segment needs --point and/or --box")
    if args.command not in ("segment", "generate-masks"):
        return COMMANDS[args.command](settings, args)
    import grpc

    from samserve.tls import TlsConfigError

    try:
        return COMMANDS[args.command](settings, args)
    except grpc.RpcError as error:  # the status as the API defines it, not a traceback
        print(f"samserve {args.command}: {error.code().name}: {error.details()}", file=sys.stderr)
    except TlsConfigError as error:
        print(f"samserve {args.command}: {error}", file=sys.stderr)
    return 1


def configure_logging(level: str) -> None:
    """One log format for every process; each record carries the id of the RPC it belongs to and its caller's
    tenant (``-`` if none)."""
    from samserve.interceptors import RequestIdLogFilter

    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s %(tenant)s]: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler])


def gateway_command(settings: GatewaySettings, args: argparse.Namespace) -> int:
    security = _security(settings)
    if security is None:
        return 2
    asyncio.run(_serve_until_signal(settings, security))
    return 0


SETTINGS: dict[str, type[GatewaySettings]] = {
    "up": StackSettings, "gateway": GatewaySettings, "segment": GatewaySettings, "generate-masks": GatewaySettings,
    "keys": GatewaySettings,
}
"""Which settings each command reads."""
COMMANDS = {
    "up": lambda settings, args: up(settings),
    "gateway": gateway_command,
    "segment": lambda settings, args: segment_command(args),
    "generate-masks": lambda settings, args: generate_masks_command(args),
    "keys": keys_command,
}


if __name__ == "__main__":
    sys.exit(main())
