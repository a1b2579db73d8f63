"""Memory-efficient fine-tuning of causal LMs on Lightning."""

__version__ = "0.1.0"
