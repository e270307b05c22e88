"""The compile pipeline as onnx_ir passes, in pipeline order (see pipeline.py); meta.py owns what they hand on."""
