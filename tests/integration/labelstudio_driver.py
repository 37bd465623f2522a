"""Drives a real Label Studio through its Python SDK (label-studio-sdk), the way an integration would; run in Label
Studio's own venv (it needs numpy 2, the project's venv keeps numpy < 2). tests/integration/test_labelstudio.py
starts it and sends one JSON object per line on stdin, ``{"op": ..., "args": {...}}``; it answers each with one
JSON line, ``{"ok": <result>}`` or ``{"error": {"status": ..., "body": ...}}`` when Label Studio refused.

    python labelstudio_driver.py http://127.0.0.1:8080 <api token>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError


class Driver:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.ls = LabelStudio(base_url=url, api_key=token)

    def create_project(self, title: str, label_config: str) -> int:
        return self.ls.projects.create(title=title, label_config=label_config).id

    def upload(self, project: int, path: str) -> list[int]:
        """A file upload, as the Import dialog does (the SDK has no upload call): the new tasks' ids."""
        with Path(path).open("rb") as file:
            response = httpx.post(f"{self.url}/api/projects/{project}/import?return_task_ids=true",
                                  files={"file": (Path(path).name, file, "image/png")},
                                  headers={"Authorization": f"Token {self.token}"}, timeout=60)
        response.raise_for_status()
        return list(response.json()["task_ids"])

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> list[int]:
        return list(self.ls.projects.import_tasks(id=project, request=tasks, return_task_ids=True).task_ids)

    def personal_token(self) -> str:
        """A new personal access token of the test's user (a JWT refresh token)."""
        return str(self.ls.tokens.create().token)

    def task_data(self, task: int) -> dict[str, Any]:
        return dict(self.ls.tasks.get(id=str(task)).data)

    def add_backend(self, project: int, url: str) -> int:
        return self.ls.ml.create(project=project, url=url, is_interactive=True, title="samserve").id

    def interactive(self, backend: int, task: int, context: dict[str, Any]) -> Any:
        """What the editor asks when a smart region is drawn: the backend's answer as Label Studio relays it."""
        raw = self.ls.ml.with_raw_response.predict_interactive(id=backend, task=task, context=context)
        return raw.response.json()

    def retrieve_predictions(self, project: int, tasks: list[int]) -> Any:
        """The Data Manager's "Retrieve Predictions" on ``tasks``: Label Studio asks the backend and stores them."""
        self.ls.actions.create(id="retrieve_tasks_predictions", project=project,
                               selected_items={"all": False, "included": tasks})
        return None

    def create_prediction(self, task: int, result: list[dict[str, Any]], score: float, model_version: str) -> int:
        return self.ls.predictions.create(task=task, result=result, score=score, model_version=model_version).id

    def predictions(self, task: int) -> list[dict[str, Any]]:
        return [{"id": p.id, "result": p.result, "score": p.score, "model_version": p.model_version}
                for p in self.ls.predictions.list(task=task)]


def main() -> None:
    driver = Driver(sys.argv[1], sys.argv[2])
    for line in sys.stdin:
        command = json.loads(line)
        try:
            answer: dict[str, Any] = {"ok": getattr(driver, command["op"])(**command["args"])}
        except ApiError as error:
            answer = {"error": {"status": error.status_code, "body": error.body}}
        print(json.dumps(answer, default=str), flush=True)


if __name__ == "__main__":
    main()
