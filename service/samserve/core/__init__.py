"""The pieces every process shares, importing nothing else of samserve: errors, settings, metrics, the model
contract (model_spec), embeddings, the generated API stubs (api) and the gRPC service config."""
