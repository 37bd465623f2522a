"""The client commands: ``samserve segment`` (one image, an overlay PNG), ``samserve interact`` (an interactive
session driven by lines of commands) and ``samserve generate-masks`` (the bulk job). TLS and the API key come from
flags or SAMSERVE_CLIENT_* (docs/security.md); a refused call prints its status, never a traceback."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc
import numpy as np
from pydantic import ValidationError

from samserve.client import bulk
from samserve.client.interact import InteractAnswer, InteractSession
from samserve.client.typed_client import FOREGROUND, Masks, PromptSpec, SamServeClient
from samserve.core.api import pb
from samserve.core.settings import ClientSettings, GatewaySettings
from samserve.security.tls import TlsConfigError
from samserve.vision import amg, polygons
from samserve.vision.images import decode_image
from samserve.vision.overlay import draw_overlay

Command = Callable[[GatewaySettings, argparse.Namespace], int]


def _reporting_errors(command: Command) -> Command:
    """``command`` with the client settings read (SAMSERVE_CLIENT_*), the target defaulted from the gateway
    settings, and a failed call or unusable TLS files printed as one line (exit 1)."""

    @functools.wraps(command)
    def run(settings: GatewaySettings, args: argparse.Namespace) -> int:
        try:
            args.client = ClientSettings()
        except ValidationError as error:
            print(f"samserve {args.command}: invalid SAMSERVE_CLIENT_* settings:\n{error}", file=sys.stderr)
            return 2
        args.target = args.target or settings.gateway_target
        try:
            return command(settings, args)
        except grpc.RpcError as error:  # the status as the API defines it, not a traceback
            print(f"samserve {args.command}: {error.code().name}: {error.details()}", file=sys.stderr)
        except TlsConfigError as error:
            print(f"samserve {args.command}: {error}", file=sys.stderr)
        return 1

    return run


def _client(args: argparse.Namespace) -> SamServeClient:
    """A client of ``args.target`` with the TLS and token flags over SAMSERVE_CLIENT_* (``args.client``)."""
    given = {name: getattr(args, name) for name in ("tls", "ca_file", "cert_file", "key_file", "server_name")}
    update = {name: value for name, value in given.items() if value}
    if args.token_file:
        update["token"] = Path(args.token_file).read_text().strip()
    return SamServeClient(args.target, security=args.client.model_copy(update=update))


def segment_command(settings: GatewaySettings, args: argparse.Namespace) -> int:
    """Segment an image through the gateway; print the masks and write an overlay PNG."""
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
    encoding = pb.MASK_ENCODING_POLYGON if args.polygon else pb.MASK_ENCODING_RLE
    with _client(args) as client:
        embedded = client.embed(data)
        (answer,) = client.segment(embedded.image_id, [prompt], encoding=encoding,
                                   polygon_tolerance_px=args.polygon_tolerance)
    print(f"image {embedded.image_id[:16]}... {embedded.width}x{embedded.height}, model {embedded.model_id}, "
          f"cached={embedded.cached}")
    for k, token in enumerate(answer.token_index):
        outline = ""
        if answer.polygons is not None:
            found = answer.polygons[k]
            outline = (f", {len(found.rings)} ring(s) of {found.vertex_count()} vertices (IoU {found.iou:.4f} with "
                       f"the mask at {found.tolerance_px:g} px)")
        print(f"mask token {token}: predicted IoU {answer.predicted_iou[k]:.3f}, stability "
              f"{answer.stability_score[k]:.3f}, area {int(answer.masks[k].sum())} px{outline}")
    if args.polygon:
        Path(args.polygon).write_text(json.dumps(polygons_document(embedded.image_id, embedded.width,
                                                                   embedded.height, answer), indent=1))
        print(f"wrote {args.polygon} (every mask's polygons)")
    if args.out:
        best = int(np.argmax(answer.predicted_iou))
        image = decode_image(data, max_pixels=1 << 31)
        overlay = draw_overlay(image, answer.masks[best], points, [label == FOREGROUND for label in labels], box)
        Path(args.out).write_bytes(overlay)
        print(f"wrote {args.out} (mask token {answer.token_index[best]}, the highest predicted IoU)")
    return 0


def polygons_document(image_id: str, width: int, height: int, answer: Masks) -> dict[str, object]:
    """What ``samserve segment --polygon FILE`` writes: per mask, COCO's ``segmentation`` (the exterior rings) and
    every ring with its role (exterior, interior = a hole) and parent, in original-image pixels."""
    assert answer.polygons is not None
    return {"image_id": image_id, "width": width, "height": height, "masks": [
        {"token_index": answer.token_index[k], "predicted_iou": float(answer.predicted_iou[k]),
         "segmentation": polygons.coco_segmentation(found),
         "rings": [ring.to_json() for ring in found.rings],
         "iou_with_mask": found.iou, "tolerance_px": found.tolerance_px, "dropped_parts": found.dropped_parts}
        for k, found in enumerate(answer.polygons)]}


INTERACT_COMMANDS: dict[str, Callable[[InteractSession, list[float]], int]] = {
    "point": lambda session, v: session.add_point(v[0], v[1], foreground=len(v) < 3 or v[2] != 0),
    "box": lambda session, v: session.set_box(*v[:4]),
    "undo": lambda session, v: session.undo(),
    "reset": lambda session, v: session.reset(),
    "choose": lambda session, v: session.choose_mask(int(v[0])),
    "finish": lambda session, v: session.finish(),
}
"""``samserve interact``'s line commands: ``point x,y[,label]``, ``box x0,y0,x1,y1``, ``undo``, ``reset``,
``choose TOKEN``, ``finish``."""


def _send_lines(session: InteractSession, lines: Iterable[str], failed: list[str]) -> None:
    """Each command line as an event, as it is read (a terminal paces them); ``finish`` at the end of the input."""
    for line in lines:
        name, _, values = line.strip().partition(" ")
        if not name or name.startswith("#"):
            continue
        try:
            INTERACT_COMMANDS[name](session, [float(v) for v in values.replace(",", " ").split()])
        except (KeyError, ValueError, IndexError):
            failed.append(f"not a command: {line.strip()!r} (point x,y[,label] | box x0,y0,x1,y1 | undo | reset | "
                          "choose TOKEN | finish)")
            break
        if name == "finish":
            return
    session.finish()


def _describe(answer: InteractAnswer) -> str:
    if not answer.masks.token_index:
        return f"event {answer.event_id}: no prompt, no mask"
    k = answer.chosen
    how = "decoded" if answer.decoded else "from the history"
    return (f"event {answer.event_id}: {answer.points} point(s), {len(answer.masks.token_index)} mask(s), shown token "
            f"{answer.masks.token_index[k]} (predicted IoU {answer.masks.predicted_iou[k]:.3f}, area "
            f"{int(answer.masks.masks[k].sum())} px), {how}")


def interact_command(settings: GatewaySettings, args: argparse.Namespace) -> int:
    """An Interact session on one image, its events read as command lines from ``--events`` (default stdin); each
    answer printed as it comes; ``--out``: an overlay of the final mask."""
    data = Path(args.image).read_bytes()
    source = sys.stdin if args.events in (None, "-") else open(args.events, encoding="utf-8")  # noqa: SIM115
    failed: list[str] = []
    with _client(args) as client, source, client.interact(data) as session:
        print(f"session on {session.opened.image_id[:16]}... {session.opened.width}x{session.opened.height}, model "
              f"{session.opened.model_id}, cached={session.opened.cached}")
        sender = threading.Thread(target=_send_lines, args=(session, source, failed), daemon=True)
        sender.start()
        while True:
            answer = session.answer()
            if session.superseded:
                print(f"superseded: events {', '.join(map(str, session.superseded))} (folded into a later state)")
                session.superseded.clear()
            print(_describe(answer))
            if answer.finished:
                break
    if failed:
        print(f"samserve interact: {failed[0]}", file=sys.stderr)
        return 2
    if args.out and answer.masks.token_index:
        image = decode_image(data, max_pixels=1 << 31)
        Path(args.out).write_bytes(draw_overlay(image, answer.masks.masks[answer.chosen]))
        print(f"wrote {args.out} (the final mask)")
    return 0


def generate_masks_command(settings: GatewaySettings, args: argparse.Namespace) -> int:
    """The bulk job (samserve.client.bulk): exit 0 when every image has its JSON, 1 when some failed."""
    root, images = bulk.list_images(args.input)
    params = bulk.params_from_args(vars(args), amg.SCALAR_PARAMETERS)
    if args.polygon:  # COCO polygons (exterior rings) as segmentation, every ring with its role in "rings"
        params.update(mask_encoding=pb.MASK_ENCODING_POLYGON, polygon_tolerance_px=args.polygon_tolerance)
    with _client(args) as client:
        report = bulk.run_bulk(images, root, args.out, client, params, concurrency=args.concurrency,
                               retry_failed=args.retry_failed, progress=not args.quiet, timeout_s=args.timeout)
    print(report.summary())
    return 1 if report.failures else 0


def client_options() -> argparse.ArgumentParser:
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


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``segment``, ``interact`` and ``generate-masks`` to the ``samserve`` parser."""
    options = client_options()
    p_segment = commands.add_parser("segment", parents=[options], help="segment an image through a running gateway")
    p_segment.set_defaults(run=_reporting_errors(segment_command), settings=GatewaySettings)
    p_segment.add_argument("image", type=Path)
    p_segment.add_argument("--point", action="append", help="x,y[,label] in image pixels; label 1 fg (default), 0 bg")
    p_segment.add_argument("--box", help="x0,y0,x1,y1 in image pixels")
    p_segment.add_argument("--single", action="store_true", help="single-mask output instead of 3 masks")
    p_segment.add_argument("--out", help="write an overlay PNG of the best mask and the prompt")
    p_segment.add_argument("--polygon", metavar="FILE", help="ask for polygons and write them as JSON: per mask "
                           "COCO's segmentation and every ring with its role (holes are interior rings)")
    p_segment.add_argument("--polygon-tolerance", type=float, default=None, metavar="PX",
                           help="simplification tolerance in pixels (server default 1; 0 = the traced outline)")
    p_interact = commands.add_parser("interact", parents=[options],
                                     help="an interactive session: clicks as command lines, each answer as it comes")
    p_interact.set_defaults(run=_reporting_errors(interact_command), settings=GatewaySettings)
    p_interact.add_argument("image", type=Path)
    p_interact.add_argument("--events", default=None, help="file of command lines (default stdin, `-`): point "
                            "x,y[,label] (label 1 fg default, 0 bg), box x0,y0,x1,y1, undo, reset, choose TOKEN "
                            "(1..3), finish (sent at the end otherwise)")
    p_interact.add_argument("--out", help="write an overlay PNG of the final mask")
    p_bulk = commands.add_parser("generate-masks", parents=[options],
                                 help="segment everything in a folder or list of images")
    p_bulk.set_defaults(run=_reporting_errors(generate_masks_command), settings=GatewaySettings)
    p_bulk.add_argument("input", type=Path, help="a folder (searched recursively) or a text file of image paths")
    p_bulk.add_argument("--out", type=Path, required=True, help="folder for one JSON per image (+ failures.json)")
    p_bulk.add_argument("--concurrency", type=int, default=4, help="images in flight (default 4)")
    p_bulk.add_argument("--retry-failed", action="store_true", help="also retry images rejected as invalid before")
    p_bulk.add_argument("--timeout", type=float, default=None, help="seconds per image (default: the client's 600)")
    p_bulk.add_argument("--quiet", action="store_true", help="no progress bar")
    p_bulk.add_argument("--polygon", action="store_true", help="segmentation as COCO polygons (holes in \"rings\") "
                        "instead of RLE")
    p_bulk.add_argument("--polygon-tolerance", type=float, default=polygons.DEFAULT_TOLERANCE_PX, metavar="PX",
                        help="simplification tolerance in pixels (default 1; 0 = the traced outline)")
    for name in amg.SCALAR_PARAMETERS:
        default = getattr(amg.AmgParams(), name)
        p_bulk.add_argument("--" + name.replace("_", "-"), type=float if isinstance(default, float) else int,
                            default=None, help=f"official default {default:g}")
