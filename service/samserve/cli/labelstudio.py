"""``samserve labelstudio``: the Label Studio ML backend (docs/labelstudio.md), in front of a running gateway."""

from __future__ import annotations

import argparse
import sys

from samserve.labelstudio.settings import LabelStudioSettings


def labelstudio_command(settings: LabelStudioSettings, args: argparse.Namespace) -> int:
    try:  # its dependencies (label-studio-converter, the labelstudio extra) load only for this command
        from samserve.labelstudio.app import serve
    except ImportError as error:
        print(f"samserve labelstudio: {error}; install the extra: pip install 'samserve[labelstudio]'",
              file=sys.stderr)
        return 2
    return serve(settings)


def register(commands: argparse._SubParsersAction) -> None:
    p_ls = commands.add_parser(
        "labelstudio", help="serve Label Studio's ML backend protocol in front of the gateway",
        description=__doc__ + " Settings: SAMSERVE_LABELSTUDIO_* (docs/settings.md); the gateway is reached with "
        "SAMSERVE_CLIENT_* (TLS, API key).")
    p_ls.set_defaults(run=labelstudio_command, settings=LabelStudioSettings)
