"""Triton kernels, each behind a plain torch function with a pure-torch reference (no `framework` imports here)."""
