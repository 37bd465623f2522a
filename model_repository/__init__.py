"""Triton model-repository templates, one folder per serving target (package data: samserve_build.model_repository)."""
