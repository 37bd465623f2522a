"""Image and mask work with numpy and OpenCV only (no Triton, no gRPC): decoding images, SAM's pre- and
post-processing, prompts to masks for one embedded image (the decoder injected), segment everything (amg), mask
encodings and overlays, and what a client needs to decode by itself."""
