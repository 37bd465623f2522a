"""Launchers of the real ``tritonserver`` and ``redis-server`` processes that ``samserve up`` and the tests run."""
