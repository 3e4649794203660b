"""Training: configuration, the method-agnostic trainer, evaluation, run folders and the high-level API."""
