"""Model export, checks and Triton repository generation for samserve."""
