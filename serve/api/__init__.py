"""The transports over one engine: gRPC (servicer, server), the OpenAI-compatible HTTP API, Ray Serve scale-out,
status mapping, auth, Prometheus metrics, and the server's configuration. Imports the engine layer, never the model
layer."""
