"""TensorRT plugins for fusegraph ops."""
