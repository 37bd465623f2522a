"""The gateway's servers: gRPC (server, servicer, request conversion, interceptors, status mapping, the model
watcher behind health) and the HTTP/JSON transport in :mod:`samserve.transport.http`."""
