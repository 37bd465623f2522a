"""``samserve labelstudio``: the Label Studio ML backend (docs/labelstudio.md), in front of a running gateway."""

from __future__ import annotations

import argparse

from samserve.labelstudio.settings import LabelStudioSettings


def labelstudio_command(settings: LabelStudioSettings, args: argparse.Namespace) -> int:
    from samserve.labelstudio.app import serve  # its dependencies (label-studio-converter) load only for this command

    return serve(settings)


def register(commands: argparse._SubParsersAction) -> None:
    p_ls = commands.add_parser(
        "labelstudio", help="serve Label Studio's ML backend protocol in front of the gateway",
        description=__doc__ + " Settings: SAMSERVE_LABELSTUDIO_* (docs/settings.md); the gateway is reached with "
        "SAMSERVE_CLIENT_* (TLS, API key).")
    p_ls.set_defaults(run=labelstudio_command, settings=LabelStudioSettings)
