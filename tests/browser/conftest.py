"""The browser tier: the web page (service/samserve/web_static, built by `make web`) in Debian's chromium, driven by
Playwright, against a real stack: Triton serving the shipped model and a gateway process with its HTTP port and the
client decoder. Every test under tests/browser is marked ``browser``.

No mocks: the page talks to the real gateway, and the tests compare what the page draws with the gateway's own
Segment / GenerateMasks answers over gRPC."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from samserve_build import export
from samserve_build.settings import SCENES_CHECKPOINT
from samserve_dev.browser import CHROMIUM, WEB_STATIC, launch_chromium
from samserve_dev.local_stack import GatewayProcess
from samserve_dev.served_models import ExportedModel, ServedModel, serve

HERE = Path(__file__).parent
# Exporting the shipped model traces the official modules (as in tests/integration/conftest.py).
TRACER_WARNINGS = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.browser)
            item.add_marker(TRACER_WARNINGS)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium (`make system-deps` installs it as root); the tier is skipped, saying so, without it."""
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if found is None:
        pytest.skip(f"browser tier: {CHROMIUM} is missing (Debian package `chromium`; `make system-deps` as root "
                    "installs it)")
    if not (WEB_STATIC / "index.html").exists():
        pytest.fail(f"the web page is not built ({WEB_STATIC}): run `make web` (npm ci && npm run build in web/)")
    return found


@pytest.fixture(scope="session")
def browser_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """The shipped model, exported through the same exporter as Meta's checkpoints."""
    result = export.export_model("scenes", SCENES_CHECKPOINT, tmp_path_factory.mktemp("browser-scenes") / "model")
    return ExportedModel("scenes", SCENES_CHECKPOINT, result.directory, result.metadata)


@pytest.fixture(scope="session")
def browser_triton(browser_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory,
                   chromium_path: str) -> Iterator[ServedModel]:
    yield from serve(browser_model, tmp_path_factory.mktemp("browser-triton"))


@pytest.fixture(scope="session")
def web_gateway(browser_triton: ServedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway on the shipped model that serves the page and gives browsers its decoder (no Redis)."""
    workdir = tmp_path_factory.mktemp("browser-gateway")
    with GatewayProcess(browser_triton.url, None, workdir,
                        client_decoder_dir=browser_triton.model.directory) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[object]:
    """Per module, never per session: Playwright's sync API runs an event loop on this thread while it lives, and
    every later test that starts one of its own (asyncio.run, asyncio.Runner) would fail."""
    with launch_chromium(chromium_path) as launched:
        yield launched


@pytest.fixture
def page(browser, web_gateway: GatewayProcess) -> Iterator[object]:
    """A fresh page (its own context: no shared cache or storage) on the gateway's `/`, the app's hooks ready.
    Console errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(web_gateway.http_url + "/")
    page.wait_for_function("document.body.dataset.state === 'idle'")
    yield page
    context.close()
    assert not errors, errors
