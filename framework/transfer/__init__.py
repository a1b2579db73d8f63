"""Trans-LoRA: transfer a trained adapter to a new base model with filtered synthetic data and distillation.

Stages (framework.transfer.pipeline): source_lora -> discriminator -> synthesize -> distill -> evaluate; entry point
`python -m framework.transfer` (framework/transfer/__main__.py, conf/transfer.yaml).
"""
