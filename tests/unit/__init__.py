"""Unit tests: no Ray, tiny models, tiny data, real torch / ONNX Runtime / files."""
