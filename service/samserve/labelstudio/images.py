"""Reads a task's image: from Label Studio itself (its URL, with its API key) or from its local-files folder.
Nothing else is fetched: an URL on another host, a redirect, or a path outside the folder is refused.

Where an image may come from (the task's data value):

* ``/data/local-files/?d=<path>``: ``SAMSERVE_LABELSTUDIO_LOCAL_FILES_ROOT``/<path>, never outside that folder;
* any other path (``/data/upload/<project>/<file>``) or an absolute URL on Label Studio's scheme, host and port:
  read from ``SAMSERVE_LABELSTUDIO_URL`` with ``SAMSERVE_LABELSTUDIO_API_KEY``.
"""

from __future__ import annotations

import threading
import urllib.parse

import httpx

from samserve.labelstudio.settings import LabelStudioSettings

LOCAL_FILES = "/data/local-files/"


class ImageUnavailable(RuntimeError):
    """The task's image cannot be read; the message says why (the task gets it as its error)."""


class ImageSource:
    """Reads task images (thread-safe). A personal access token (a JWT) is exchanged for an access token once and
    again when Label Studio answers 401; a legacy token is sent as is."""

    def __init__(self, settings: LabelStudioSettings) -> None:
        self.base = settings.url.rstrip("/") if settings.url else None
        self.api_key = settings.api_key
        self.root = settings.local_files_root.resolve() if settings.local_files_root else None
        self.max_bytes = settings.max_image_bytes
        self.http = httpx.Client(timeout=settings.timeout_s, follow_redirects=False)
        self._access: str | None = None
        self._lock = threading.Lock()

    def read(self, reference: str) -> bytes:
        """The bytes of the image a task names (``reference``: its data value)."""
        if not isinstance(reference, str) or not reference:
            raise ImageUnavailable(f"task image {reference!r}: a path or URL")
        if reference.startswith(LOCAL_FILES):
            return self._local(reference)
        parts = urllib.parse.urlsplit(reference)
        if parts.scheme or parts.netloc:
            if self.base is None or urllib.parse.urlsplit(self.base)[:2] != parts[:2]:
                raise ImageUnavailable(f"{reference}: not on Label Studio's URL (SAMSERVE_LABELSTUDIO_URL="
                                       f"{self.base}); samserve fetches nothing else")
            return self._fetch(reference)
        if not reference.startswith("/"):
            raise ImageUnavailable(f"{reference}: neither a Label Studio path (/data/...) nor its URL")
        if self.base is None:
            raise ImageUnavailable(f"{reference}: a Label Studio path, but SAMSERVE_LABELSTUDIO_URL is unset")
        return self._fetch(self.base + reference)

    def _local(self, reference: str) -> bytes:
        relative = urllib.parse.parse_qs(urllib.parse.urlsplit(reference).query).get("d", [""])[0]
        if self.root is None:
            raise ImageUnavailable(f"{reference}: a local file, but SAMSERVE_LABELSTUDIO_LOCAL_FILES_ROOT is unset")
        path = (self.root / relative).resolve()
        if not relative or not path.is_relative_to(self.root):
            raise ImageUnavailable(f"{reference}: outside SAMSERVE_LABELSTUDIO_LOCAL_FILES_ROOT")
        try:
            with path.open("rb") as file:
                data = file.read(self.max_bytes + 1)
        except OSError as error:
            raise ImageUnavailable(f"{reference}: {error.strerror}") from None
        return self._bounded(reference, data)

    def _fetch(self, url: str) -> bytes:
        status, location, data = self._get(url, self._authorization())
        if status == 401 and self._is_personal_token():
            status, location, data = self._get(url, self._authorization(refresh=True))
        if location is not None:
            raise ImageUnavailable(f"{url}: Label Studio redirects to {location}; samserve follows no redirect")
        if status != 200:
            raise ImageUnavailable(f"{url}: Label Studio answered HTTP {status}")
        return self._bounded(url, data)

    def _get(self, url: str, authorization: str | None) -> tuple[int, str | None, bytes]:
        """(status, the redirect's location or None, the body: at most one byte over the limit, decoded)."""
        headers = {"Authorization": authorization} if authorization else {}
        data = bytearray()
        try:
            with self.http.stream("GET", url, headers=headers) as response:
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        break
                location = response.headers.get("location") if response.is_redirect else None
                return response.status_code, location, bytes(data[:self.max_bytes + 1])
        except httpx.HTTPError as error:
            raise ImageUnavailable(f"{url}: {error}") from None

    def _bounded(self, reference: str, data: bytes) -> bytes:
        if len(data) > self.max_bytes:
            raise ImageUnavailable(f"{reference}: more than SAMSERVE_LABELSTUDIO_MAX_IMAGE_BYTES={self.max_bytes}")
        return data

    def _is_personal_token(self) -> bool:
        return self.api_key is not None and self.api_key.count(".") == 2

    def _authorization(self, refresh: bool = False) -> str | None:
        if self.api_key is None:
            return None
        if not self._is_personal_token():
            return f"Token {self.api_key}"
        with self._lock:
            if self._access is None or refresh:
                self._access = self._exchange()
            return f"Bearer {self._access}"

    def _exchange(self) -> str:
        """A personal access token (a refresh JWT) exchanged for a short-lived access token."""
        try:
            response = self.http.post(f"{self.base}/api/token/refresh/", json={"refresh": self.api_key})
        except httpx.HTTPError as error:
            raise ImageUnavailable(f"Label Studio token refresh: {error}") from None
        if response.status_code != 200 or "access" not in response.json():
            raise ImageUnavailable(f"Label Studio refused the personal access token (HTTP {response.status_code})")
        return str(response.json()["access"])

    def close(self) -> None:
        self.http.close()
