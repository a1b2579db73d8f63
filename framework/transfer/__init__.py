"""Trans-LoRA: transfer a trained adapter to a new base model with filtered synthetic data and distillation.

Stages (memfit.transfer.pipeline): source_lora -> discriminator -> synthesize -> distill -> evaluate; entry point
`python -m memfit.transfer` (framework/transfer/__main__.py, conf/transfer.yaml).
"""
