"""Backend-neutral quantization that several targets share: the spec (the one place that
validates modes, methods and op kinds), calibration, sensitivity, PT2E, QAT and the ONNX graph helper."""
