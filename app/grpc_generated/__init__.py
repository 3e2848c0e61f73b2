"""Generated code of the Open Inference Protocol's gRPC definition (grpc_predict_v2.proto beside it).

Do not edit grpc_predict_v2_pb2*.py: `python -m app.grpc_generated.generate` writes them (README.md).
"""
