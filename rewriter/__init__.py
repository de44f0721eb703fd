"""fusegraph: declarative pattern matching and fusion for ONNX."""
