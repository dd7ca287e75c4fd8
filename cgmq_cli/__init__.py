"""cgmq: Constraint Guided Model Quantization under a hard hardware budget."""

__version__ = "0.1.0"
