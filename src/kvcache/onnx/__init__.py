"""ONNX export, KV-cache injection and ONNX Runtime generation (needs the ``onnx`` extra)."""
