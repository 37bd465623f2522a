"""The committed cases, replayed before any generation: every corpus image through each method that takes image
bytes, every corpus request message as it is, and every regression case (a request that once broke the property)
with the status code it must get now. Files: ``corpus/<name>.<ext>`` (images), ``corpus/<Method>.<name>.bin`` and
``regressions/<Method>.<CODE>.<name>.bin`` (serialized requests); see tests/fuzz/README.md."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from samserve.core.api import pb
from tests.fuzz.harness import CORPUS, METHODS, REGRESSIONS, FuzzTarget, saved_requests

IMAGES = sorted(p for p in CORPUS.iterdir() if p.is_file() and p.suffix != ".bin")


def _image_requests(data: bytes) -> dict[str, bytes]:
    point = pb.Prompt(points=[pb.Point(x=0, y=0, label=pb.POINT_LABEL_FOREGROUND)])
    return {
        "Embed": pb.EmbedRequest(image=data).SerializeToString(),
        "Segment": pb.SegmentRequest(image_bytes=data, prompts=[point]).SerializeToString(),
        "GenerateMasks": pb.GenerateMasksRequest(image_bytes=data, points_per_side=2).SerializeToString(),
    }


@pytest.mark.parametrize("path", IMAGES, ids=[p.name for p in IMAGES])
def test_corpus_image_through_every_method(fuzz_target: FuzzTarget, path: Path):
    for method, payload in _image_requests(path.read_bytes()).items():
        fuzz_target.call(method, payload)


@pytest.mark.parametrize("path", saved_requests(CORPUS), ids=[p.name for p in saved_requests(CORPUS)])
def test_corpus_request(fuzz_target: FuzzTarget, path: Path):
    method = path.name.split(".")[0]
    assert method in METHODS, f"{path.name}: name it <Method>.<what>.bin"
    fuzz_target.call(method, path.read_bytes())


@pytest.mark.parametrize("path", saved_requests(REGRESSIONS), ids=[p.name for p in saved_requests(REGRESSIONS)])
def test_regression(fuzz_target: FuzzTarget, path: Path):
    method, expected = path.name.split(".")[:2]
    assert method in METHODS and expected in grpc.StatusCode.__members__, f"{path.name}: <Method>.<CODE>.<what>.bin"
    assert fuzz_target.call(method, path.read_bytes()).name == expected
