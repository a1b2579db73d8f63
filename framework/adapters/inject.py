"""Put adapter layers into a model and initialise them, batched by weight shape, one group at a time on the init device.

Only one group of same-shaped weights (at most `init_batch` matrices) is on the init device at a time, in fp32, so a
model that does not fit on one GPU still initialises there; residuals go back to each weight's own device and dtype.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from memfit.adapters.inits import LORA_INITS, Quantizer, loftq_factors, lora_factors, pissa_factors, qpissa_factors
from memfit.adapters.layer import LowRankAdapter, base_shape, dense
from memfit.adapters.svd import check_rank
from memfit.adapters.targets import find_targets, pattern_value, unused_patterns

INITS = ("lora", "pissa", "loftq")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class AdapterSpec:
    """Everything `inject` needs, independent of Hydra (see conf/adapter/*.yaml for the same fields)."""

    init: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    rslora: bool = False
    lora_init: str = "kaiming"
    niter: int | None = None
    iters: int = 1
    init_device: str = "auto"
    init_batch: int = 16
    seed: int = 0
    progress: bool = True


def check_weight(name: str, module: nn.Module, needs_dense: bool) -> None:
    """Adapters need a floating base; SVD inits need a full-precision one (a quantized base must go through QPiSSA)."""
    w = module.weight
    if type(w) not in (torch.Tensor, nn.Parameter):
        if needs_dense:
            raise TypeError(f"{name}: the base weight is already stored as {type(w).__name__}; PiSSA/LoftQ need the "
                            "full-precision weight: initialise on the dense model and pick storage=nf4 (QPiSSA path)")
        return
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: base weight dtype {w.dtype} is not a float type; adapters need float weights")


def resolve_device(init_device: str) -> torch.device | None:
    """`auto`: the GPU when there is one, else where each weight lives (None)."""
    if init_device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(init_device)


def inject(model: nn.Module, spec: AdapterSpec, quantize_for: Callable[[nn.Module], Quantizer] | None = None) -> dict[str, LowRankAdapter]:
    """Freeze `model`, wrap the target modules in adapter layers, and initialise them. `quantize_for(base_layer)`
    returns the storage quantizer (dense (out, in) -> dequantized) used by QPiSSA / LoftQ."""
    if spec.init not in INITS:
        raise ValueError(f"adapter init {spec.init!r} is not a valid option; choose one of: {', '.join(INITS)}")
    if spec.lora_init not in LORA_INITS:
        raise ValueError(f"adapter.init={spec.lora_init!r} is not a valid option; choose one of: {', '.join(LORA_INITS)}")
    if spec.init == "loftq" and quantize_for is None:
        raise ValueError("adapter=loftq needs a quantized storage (storage=nf4): LoftQ fits the quantization error")
    names = find_targets(model, spec.targets)
    for label, pats in (("rank_pattern", spec.rank_pattern), ("alpha_pattern", spec.alpha_pattern)):
        if bad := unused_patterns(names, pats):
            raise ValueError(f"adapter.{label} keys {bad} match none of the adapted modules")
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, LowRankAdapter] = {}
    for name in names:
        base = model.get_submodule(name)
        check_weight(name, base, needs_dense=spec.init != "lora")
        rank = int(pattern_value(name, spec.rank_pattern, spec.rank))
        alpha = float(pattern_value(name, spec.alpha_pattern, spec.alpha))
        try:
            check_rank(base_shape(base), rank)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        layer = LowRankAdapter(base, rank, alpha, spec.dropout, spec.rslora)
        model.set_submodule(name, layer)
        layers[name] = layer
    initialise(layers, spec, quantize_for)
    return layers


def _groups(layers: dict[str, LowRankAdapter], batch: int) -> list[list[str]]:
    """Same (out, in, rank, scaling, layout, device) -> one batched init; chunks of at most `batch` matrices."""
    by_key: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for name, lay in layers.items():
        w = lay.base_layer.weight
        key = (lay.out_features, lay.in_features, lay.rank, lay.scaling, lay.fan_in_fan_out, w.dtype, str(w.device))
        by_key[key].append(name)
    size = max(1, int(batch))
    return [names[i:i + size] for names in by_key.values() for i in range(0, len(names), size)]


def initialise(layers: dict[str, LowRankAdapter], spec: AdapterSpec,
               quantize_for: Callable[[nn.Module], Quantizer] | None = None) -> None:
    """Run the init of `spec` over all layers, group by group, and record it in each layer's `init_meta`."""
    device = resolve_device(spec.init_device)
    gen_cpu = torch.Generator().manual_seed(int(spec.seed))
    gens: dict[str, torch.Generator] = {}
    groups = _groups(layers, spec.init_batch)
    quantized = quantize_for is not None and spec.init in ("pissa", "loftq")
    for names in tqdm(groups, desc=f"{spec.init} init", disable=not spec.progress or len(groups) < 4):
        first = layers[names[0]]
        dev = device or first.base_layer.weight.device
        gen = gen_cpu if dev.type == "cpu" else gens.setdefault(str(dev), torch.Generator(dev).manual_seed(int(spec.seed)))
        # move in the stored dtype, cast on the device: half the transfer, no CPU-side conversion
        w = torch.stack([_matrix(layers[n]).to(device=dev, non_blocking=True) for n in names]).float()
        r, s = first.rank, first.scaling
        if spec.init == "lora":
            bb, aa, _ = lora_factors(w, r, spec.lora_init, gen_cpu)
            base = None
        elif quantized:
            quant = quantize_for(first.base_layer)
            fn = qpissa_factors if spec.init == "pissa" else loftq_factors
            bb, aa, base = fn(w, r, s, quant, spec.iters, spec.niter, gen)
        else:
            bb, aa, base = pissa_factors(w, r, s, spec.niter, gen)
        for i, n in enumerate(names):
            lay = layers[n]
            lay.set_factors(bb[i], aa[i], keep_init=base is not None)
            if base is not None:
                lay.set_base_weight(base[i])
            lay.init_meta = _meta(spec, base is not None, quantized)
        del w, bb, aa, base


def _matrix(layer: LowRankAdapter) -> torch.Tensor:
    w = dense(layer.base_layer.weight)
    return w.t() if layer.fan_in_fan_out else w


def _meta(spec: AdapterSpec, modified: bool, quantized: bool) -> dict[str, Any]:
    name = {"lora": "lora", "pissa": "qpissa" if quantized else "pissa", "loftq": "loftq"}[spec.init]
    return {"init": name, "niter": spec.niter, "iters": spec.iters if quantized else 1, "base_modified": modified,
            "note": ("the frozen base weight was replaced by the residual W - s*B0@A0: use convert_to_lora / "
                     "export_peft to share an adapter usable on the original base") if modified else ""}
