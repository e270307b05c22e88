"""ONNX files in and out (validated loading, atomic saving) and the exporters from torch / Hugging Face / GGUF."""
