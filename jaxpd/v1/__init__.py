"""Generated protobuf and gRPC code for `protos/jaxpd/v1/*.proto` (`make protos`; do not edit)."""
