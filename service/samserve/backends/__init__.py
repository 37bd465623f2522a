"""What runs inside Triton's python backend (never in the gateway): the encoder and decoder models and their
runtime registry (ONNX Runtime, OpenVINO, or the PyTorch runtime of ``gpu-torch`` by name). Imports samserve.core
only."""
