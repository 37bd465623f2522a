"""The gateway's client of the two Triton models: request layout and dtypes from the served configs, how tensors
travel (inline gRPC, system or CUDA shared memory), Triton errors mapped to domain errors."""
