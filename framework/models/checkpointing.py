"""Activation checkpointing: one switch (`model.activation_checkpointing`) for every trainer.

Each decoder block keeps only its input and recomputes its activations in backward (non-reentrant checkpointing,
which composes with FSDP2's hooks, adapters, NF4/NeuZip storage and CCE). `auto` turns it on for sequences of
AUTO_MIN_TOKENS or more, where the saved activations, not the weights, dominate memory.
"""

from __future__ import annotations

from torch import nn

AUTO_MIN_TOKENS = 2048
CHOICES = (True, False, "auto")


def wanted(setting: bool | str | None, seq_len: int | None) -> bool:
    """Whether to checkpoint, from the config value and the run's sequence length (data.max_length)."""
    if setting in (None, False):
        return False
    if setting is True:
        return True
    if setting == "auto":
        return seq_len is not None and seq_len >= AUTO_MIN_TOKENS
    raise ValueError(f"model.activation_checkpointing={setting!r} is not a valid option; choose one of: true, false, "
                     "auto")


def enable(model: nn.Module) -> None:
    """Turn on per-block activation checkpointing of an HF model (non-reentrant)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"model.activation_checkpointing=true but {type(model).__name__} does not support it (an HF "
                         "PreTrainedModel with supports_gradient_checkpointing is needed)")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()  # HF checkpoints blocks only in training mode


def is_enabled(model: nn.Module) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None) or getattr(model, "is_gradient_checkpointing",
                                                                               False))
