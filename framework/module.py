"""The LightningModule: a causal LM (with its adapters and weight storage), a pluggable LM loss, metrics, optimizers.

The loss is a function of (hidden states, lm_head weight, labels), so the fused CCE kernel drops in without the model
ever producing logits during training. Evaluation greedily generates answers and scores exact match per task.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from memfit.loss import TorchCrossEntropy


def first_line(text: str) -> str:
    """The model's answer: generated text up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


class LMModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        generate_batches: int = -1,
        task_names: list[str] | None = None,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.loss_fn = loss_fn or TorchCrossEntropy()
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.generate_batches = generate_batches
        self.task_names = list(task_names or ["default"])
        self._acc = torch.zeros(len(self.task_names), 2, dtype=torch.long)  # (correct, total) per task
        self.predictions: list[dict[str, str]] = []

    # ---------------------------------------------------------------------------------------------------- loss
    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states of the decoder body (no logits)."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def lm_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        root = self.__dict__.get("_fsdp_root")
        if root is not None and not root.active:  # FSDP2: run inside the root unit's forward (framework/parallel)
            return root(self.lm_loss, batch)
        hidden = self.hidden_states(batch["input_ids"], batch.get("attention_mask"))
        head = self.lm_head
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        return self.loss_fn(hidden, head.weight, batch["labels"], bias=getattr(head, "bias", None), shift=1, softcap=softcap)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.lm_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        return loss

    # ---------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def generate_answers(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> list[str]:
        tok = self.tokenizer
        was_training = self.model.training
        self.model.eval()
        root = self.__dict__.get("_fsdp_root")
        generate = self.model.generate if root is None else (lambda **kw: root(self.model.generate, **kw))
        out = generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            synced_gpus=root is not None and self.trainer.world_size > 1,  # sharded: every rank runs every step
        )
        self.model.train(was_training)
        return [first_line(t) for t in tok.batch_decode(out[:, prompt_ids.shape[1]:], skip_special_tokens=True)]

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, prefix: str) -> None:
        bs = batch["input_ids"].shape[0]
        loss = self.lm_loss(batch)
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True, batch_size=bs)
        if "prompt_ids" not in batch or (0 <= self.generate_batches <= batch_idx):
            return
        targets = batch["targets"]
        max_new = max(len(self.tokenizer.encode(" " + t, add_special_tokens=False)) for t in targets) + 2
        preds = self.generate_answers(batch["prompt_ids"], batch["prompt_mask"], max_new)
        for task, pred, target in zip(batch["tasks"], preds, targets):
            i = self.task_names.index(task) if task in self.task_names else 0
            self._acc[i, 0] += int(pred == target.strip())
            self._acc[i, 1] += 1
            self.predictions.append({"task": task, "prediction": pred, "target": target})

    def _eval_epoch_start(self) -> None:
        self._acc.zero_()
        self.predictions = []

    def _eval_epoch_end(self, prefix: str) -> None:
        counts = self._acc.to(self.device)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.float(), reduce_op="sum").long()
        if counts[:, 1].sum() == 0:
            return
        for name, (c, n) in zip(self.task_names, counts.tolist()):
            if n and len(self.task_names) > 1:
                self.log(f"{prefix}/acc/{name}", c / n)
        self.log(f"{prefix}/acc", counts[:, 0].sum().float() / counts[:, 1].sum(), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start()

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ---------------------------------------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """trainer=fsdp: the strategy shards the model once the process group exists (idempotent: fit after test)."""
        shard = getattr(self.trainer.strategy, "shard", None)
        if shard is not None and self.__dict__.get("_fsdp_root") is None:
            # a before-training test() calls this hook under inference mode: sharded parameters made there would be
            # inference tensors, unusable for the training that follows
            with torch.inference_mode(False):
                self.__dict__["_fsdp_root"] = shard(self.model)  # kept out of the module tree: no duplicate keys

    # ---------------------------------------------------------------------------------------------- optimizers
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters: check adapter.targets / the adapter config")
        opt = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.scheduler_interval}}


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                  min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to `min_ratio` of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
