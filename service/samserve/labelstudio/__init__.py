"""A Label Studio ML backend in front of the gateway (``samserve labelstudio``; docs/labelstudio.md).

Label Studio calls it over HTTP (``/health``, ``/setup``, ``/predict``, ``/webhook``); it reads the task's image
from Label Studio, asks the gateway over gRPC (:class:`samserve.client.SamServeClient`) and answers with the
labeling config's own control names: BrushLabels (Label Studio's RLE) or PolygonLabels. No benchmark runs it
(bench/freshness.py, NOT_MEASURED), and no other layer of samserve imports it (the import rule, pyproject.toml).
"""
