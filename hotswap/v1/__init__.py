"""hotswap.v1: the gRPC API. ``hotswap_pb2``/``hotswap_pb2_grpc`` are generated from proto/ at install time."""
