"""Runtime backends, one file each: llama.cpp (narrative), ONNX Runtime / TensorRT (vision)."""
