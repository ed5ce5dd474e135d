"""On-premise defect-inspection appliance: images in, schema-valid inspection reports out.

The runtime package. It never imports torch, transformers or peft: inference runs on ONNX Runtime /
TensorRT and llama.cpp. Training (`train/`) and export (`export/`) import from here, never the reverse.
"""

__version__ = "0.1.0"
