"""Generated gRPC/protobuf code for the public API (from `protos/`, by `make protos`; never edited)."""
