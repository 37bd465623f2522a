"""HTTP/JSON on the gateway: routes from the proto's ``google.api.http`` options, transcoded into calls on the
gRPC server, the web page, and the generated OpenAPI document."""
