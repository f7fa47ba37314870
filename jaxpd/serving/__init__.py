"""The gRPC service: router, prefill and decode workers, launcher, client."""
