"""The shipped model and its model card (package data: samserve_build.checkpoints)."""
