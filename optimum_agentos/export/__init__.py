"""Export agentos checkpoints to deployable runtime formats (GGUF, ONNX, compressed-tensors)."""
