"""What ``samserve labelstudio`` reads: ``SAMSERVE_LABELSTUDIO_<NAME>`` (docs/settings.md). How it reaches the
gateway (TLS, API key) is :class:`samserve.core.settings.ClientSettings`, as for every client."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from samserve.core.settings import LogLevel


class LabelStudioSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAMSERVE_LABELSTUDIO_", extra="ignore")

    host: str = Field("127.0.0.1", description="address the backend listens on (0.0.0.0: every interface)")
    port: int = Field(9090, ge=1, le=65535, description="its HTTP port: the URL you give Label Studio's Model page")
    gateway: str = Field("127.0.0.1:50051", description="the gateway's gRPC target (`host:port`, a list, or a "
                         "gRPC URI), reached with the SAMSERVE_CLIENT_* settings")
    url: str | None = Field(
        None, description="Label Studio's own URL (e.g. http://localhost:8080): task images under it "
        "(`/data/upload/...`, or absolute URLs on the same host and port) are read from it with the API key below; "
        "unset = only local files (`local_files_root`)")
    api_key: str | None = Field(
        None, description="Label Studio API key the images are read with: a legacy token (`Authorization: Token`; "
        "Organization settings must allow legacy tokens) or a personal access token (a JWT, exchanged at "
        "/api/token/refresh/ for a short-lived access token)")
    local_files_root: Path | None = Field(
        None, description="Label Studio's LOCAL_FILES_DOCUMENT_ROOT, for tasks whose image is "
        "`/data/local-files/?d=<path>`: read from this directory, never outside it; unset = such tasks fail")
    model_version: str = Field("samserve", description="the model version Label Studio records on predictions")
    max_image_bytes: int = Field(64 << 20, ge=1, description="largest task image read, in bytes")
    timeout_s: float = Field(60.0, gt=0, description="seconds for one image read and one gateway call")
    polygon_tolerance_px: float | None = Field(
        None, ge=0, description="PolygonLabels answers: Douglas-Peucker tolerance in image pixels (unset: the "
        "gateway's default, 1 px)")
    generate_params: dict[str, float] = Field(
        default_factory=dict, description="pre-annotation (tasks sent without a prompt, e.g. Label Studio's "
        "'Retrieve predictions'): GenerateMasks parameters by name as JSON, e.g. "
        "`{\"pred_iou_thresh\": 0.2, \"stability_score_thresh\": 0.5}`; unset ones keep the official defaults")
    log_level: LogLevel = Field(LogLevel.INFO, description="log level")
