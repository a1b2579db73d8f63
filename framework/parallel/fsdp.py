"""FSDP2 (`fully_shard`) for the LM module: wrapping policy, mixed precision, activation checkpointing, a Lightning
strategy (`trainer=fsdp`) and a rank-0 export of the trainable tensors as full (unsharded) tensors.

Why a root wrapper: the LM module computes its loss from `model.base_model(...)` and `lm_head.weight` directly (so a
fused CCE never materialises logits); FSDP2 only all-gathers a unit's parameters inside that unit's `forward`. The root
unit is therefore a thin `ShardedRoot` whose forward runs any callable (the loss, `generate`), so the embeddings,
final norm and lm_head (kept in the root unit) are unsharded exactly while the loss or generation runs.

Frozen weights stored as tensor subclasses (NF4, NeuZip) stay what they are: a subclass that implements the FSDP2
all-gather extension (`fsdp_pre_all_gather`/`fsdp_post_all_gather`) is sharded as itself (compressed per shard); one
that does not is left out of sharding (`ignored_params`, replicated, still compressed) instead of being densified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from memfit.config import check_choice

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | None] = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                          "float32": torch.float32, "none": None}


def _dtype(field: str, name: str | None) -> torch.dtype | None:
    key = "none" if name is None else str(name)
    check_choice(field, key, DTYPES)
    return DTYPES[key]


def is_plain(t: torch.Tensor) -> bool:
    """A plain tensor (or Parameter of one), as opposed to a storage subclass such as NF4Tensor."""
    data = t.data if isinstance(t, nn.Parameter) else t
    return type(data) in (torch.Tensor, nn.Parameter)


def has_fsdp_hooks(t: torch.Tensor) -> bool:
    data = t.data if isinstance(t, nn.Parameter) else t
    return hasattr(data, "fsdp_pre_all_gather") and hasattr(data, "fsdp_post_all_gather")


def unshardable_params(model: nn.Module) -> set[nn.Parameter]:
    """Subclass-held parameters without FSDP2 hooks: FSDP2 would have to densify them, so they stay replicated."""
    return {p for p in model.parameters() if not is_plain(p) and not has_fsdp_hooks(p)}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: HF's `_no_split_modules` classes, else the modules of the largest nn.ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def is_trainable_linear(module: nn.Module) -> bool:
    """An nn.Linear or a low-rank adapter layer that owns at least one trainable parameter directly."""
    linear_like = isinstance(module, nn.Linear) or (hasattr(module, "lora_A") and hasattr(module, "lora_B"))
    return linear_like and any(p.requires_grad for p in module.parameters(recurse=False))


class ShardedRoot(nn.Module):
    """The FSDP2 root unit: `root(fn, *args)` runs `fn` inside this module's forward (see the module docstring)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.active = False

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.active = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.active = False


def shard_model(model: nn.Module, mesh: Any = None, *, param_dtype: str | None = "bfloat16",
                reduce_dtype: str | None = "float32", activation_checkpointing: bool = False,
                reshard_after_forward: bool = True, shard_linears: bool = True) -> ShardedRoot:
    """Apply `fully_shard` to each trainable Linear (not the embeddings / lm_head, whose weights the loss reads
    directly), each transformer block, and a `ShardedRoot` around `model`; returns the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=_dtype("strategy.param_dtype", param_dtype),
                              reduce_dtype=_dtype("strategy.reduce_dtype", reduce_dtype))
    if activation_checkpointing:  # the app sets model.activation_checkpointing instead (memfit.assemble)
        from memfit.models import checkpointing

        checkpointing.enable(model)
    ignored = unshardable_params(model)
    if ignored:
        log.warning("FSDP2: %d frozen tensor-subclass parameter(s) lack FSDP2 all-gather hooks; kept replicated",
                    len(ignored))
    kw: dict[str, Any] = {"mesh": mesh, "mp_policy": mp, "ignored_params": ignored or None}
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"FSDP2: found no transformer blocks in {type(model).__name__} (no _no_split_modules and no "
                         "nn.ModuleList)")
    direct = {id(m) for m in (_get(model, "get_input_embeddings"), _get(model, "get_output_embeddings")) if m is not None}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if shard_linears:  # the targets first: sharding changes parameters (torch 2.11 marks sharded subclass ones trainable)
        for module in [m for m in model.modules() if id(m) not in direct and is_trainable_linear(m)]:
            base = getattr(module, "base_layer", None)
            if isinstance(base, nn.Module) and any(True for _ in base.parameters()):
                # the frozen base in a unit of its own: FSDP2 needs one dtype per unit, and a bf16 base with fp32
                # adapter factors (the normal fine-tuning case) would otherwise share the adapter layer's unit
                fully_shard(base, reshard_after_forward=reshard_after_forward, **kw)
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kw)
    for block in blocks:
        _check_uniform_dtype(block, ignored)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    root = ShardedRoot(model)
    fully_shard(root, reshard_after_forward=reshard_after_forward, **kw)
    _keep_frozen(model, frozen)
    return root


def _keep_frozen(model: nn.Module, frozen: set[str]) -> None:
    """Frozen weights stay frozen after sharding. FSDP2 replaces every parameter by a sharded one; torch 2.11 gave
    the sharded NF4/NeuZip (tensor-subclass) ones requires_grad=True, which would hand them to the optimizer."""
    for n, p in model.named_parameters():
        if n in frozen and p.requires_grad:
            p.requires_grad_(False)


def _check_uniform_dtype(block: nn.Module, ignored: set[nn.Parameter]) -> None:
    """FSDP2 flattens a unit's parameters into one buffer, so they must share a dtype. Say which parameters differ
    (and how to fix it) instead of FSDP2's bare assertion."""
    from torch.distributed.fsdp import FSDPModule

    seen: set[int] = set()
    for sub in block.modules():
        if sub is not block and isinstance(sub, FSDPModule):
            seen.update(id(p) for p in sub.parameters())
    left = {n: p.dtype for n, p in block.named_parameters() if id(p) not in seen and p not in ignored}
    if len(set(left.values())) > 1:
        by_dtype: dict[torch.dtype, list[str]] = {}
        for n, d in left.items():
            by_dtype.setdefault(d, []).append(n)
        desc = "; ".join(f"{d}: {', '.join(ns[:3])}{' ...' if len(ns) > 3 else ''}" for d, ns in by_dtype.items())
        raise ValueError(f"FSDP2: the parameters of one {type(block).__name__} unit have different dtypes ({desc}). "
                         "Adapter layers get units of their own (trainer.strategy.shard_linears=true); for other "
                         "trainable parameters use one dtype, e.g. model.dtype=float32 with "
                         "trainer.strategy.param_dtype=bfloat16 for bf16 compute")


def _get(model: nn.Module, name: str) -> nn.Module | None:
    fn = getattr(model, name, None)
    try:
        return fn() if callable(fn) else None
    except NotImplementedError:
        return None


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors as full CPU tensors: a collective on every rank (DTensor all-gather); use the result on rank 0."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.detach()
        if hasattr(t, "full_tensor"):  # DTensor shard -> gather the whole tensor
            t = t.full_tensor()
        out[name] = t.cpu().clone()
    return out


def save_trainable(model: nn.Module, path: str | Path) -> Path | None:
    """Gather the trainable (adapter) tensors on every rank and write them on rank 0 as one safetensors file."""
    from safetensors.torch import save_file

    state = full_trainable_state(model)
    path = Path(path)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return path if rank == 0 else None


def save_sharded_model(module: nn.Module, cfg: Any, out_dir: Path) -> None:
    """`save_model=DIR` under FSDP2: gather the full state (collective, CPU), rank 0 writes a plain HF directory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from memfit.export import export_hf

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        export_hf(cfg, state, out_dir)
        log.info("saved model to %s", out_dir)
    if dist.is_initialized():
        dist.barrier()


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy over a 1-D data-parallel mesh of all ranks, sharding with `shard_model`.

    The LightningModule calls `shard_model_for_module` from its `configure_model` hook. Keep the trainer precision at
    32-true: sharded parameters are fp32 master weights and `param_dtype` sets the all-gather/compute dtype.
    """

    def __init__(self, param_dtype: str | None = "bfloat16", reduce_dtype: str | None = "float32",
                 activation_checkpointing: bool = False, reshard_after_forward: bool = True,
                 shard_linears: bool = True, save_distributed_checkpoint: bool = True, **kwargs: Any):
        _dtype("strategy.param_dtype", param_dtype)
        _dtype("strategy.reduce_dtype", reduce_dtype)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.shard_options = dict(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                  activation_checkpointing=activation_checkpointing,
                                  reshard_after_forward=reshard_after_forward, shard_linears=shard_linears)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # pure FSDP: shard over every rank
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, model: nn.Module) -> ShardedRoot:
        return shard_model(model, self.device_mesh["data_parallel"], **self.shard_options)
