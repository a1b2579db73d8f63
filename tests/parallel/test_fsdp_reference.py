"""FSDP2 with the app's DEFAULT settings on 2 gloo ranks against an independent, unsharded reference.

Sharded run (2 spawned processes): the app's model as `memfit.train` assembles it (a tiny random Llama, with an
adapter: LoRA or PiSSA, a weight storage: dense, NF4 = QPiSSA, or NeuZip, from an fp32 or bf16 checkpoint), sharded
by `shard_model` with the options of the app's `FSDP2Strategy` composed from `conf/trainer/fsdp.yaml` (bf16
all-gather and compute, fp32 master weights, fp32 gradient reduce-scatter while those are the defaults), the app's
loss through `LMModule.lm_loss` (the FSDP root unit; CCE) and the app's optimizer (AdamW, lr 1e-3). Each rank trains
on its half of fixed global batches for STEPS steps; rank 0 writes the per-step global loss, the all-gathered
gradients and the trainable parameters (`full_trainable_state`, what the app exports) before and after every step.

Reference (the test process; no process group, no FSDP code, no storage code in its forward): the same assembled
model, unsharded, with FSDP2's MixedPrecisionPolicy emulated by hand: frozen weights (NF4 / NeuZip dequantized) cast
once to `param_dtype`; before each forward the fp32 masters are cast to `param_dtype`; each rank's half of the batch
runs forward and backward separately; the halves' gradients are cast to `reduce_dtype` and averaged; the optimizer
steps the fp32 masters. The global loss is the mean of the halves' losses (equal token counts: the whole batch's).

Three comparisons, all against the same sharded run:
1. "same order", teacher-forced: at every step the reference computes the loss and gradients at its parameters
   (checked equal to the sharded run's), then applies its optimizer to the SHARDED run's gradients and must land on
   the sharded run's updated parameters. Its adapter layers take their input through an identity autograd node, as
   FSDP2 does for every unit's inputs, so each layer's input gradient is summed (base + adapter) before it joins the
   other consumers of that tensor (q/k/v, gate/up): the same floating-point operations in the same order. Required
   difference: 0 in loss, gradients and parameters. (This is what sees a reduce-scatter in bf16 instead of the
   configured fp32: 0.7 u on the gradients, inside any rounding tolerance.)
2. "autograd order", teacher-forced: the same without that node (autograd sums all 6 / 4 consumers in its own
   order), with tolerances from the dtype, so the check does not depend on how FSDP2 builds its graph.
3. free-running: the autograd-order reference on its own gradients throughout; checks the loss curve of the loop.
Why teacher forcing for the parameters: an element whose gradient is ~0 (lora_A's first gradients, B starting at 0)
is moved by Adam's sign-like first steps by +-lr whatever its size, so one rounding of difference there becomes a
2e-3 weight difference that says nothing about sharding.

Tolerances of 2. and 3. (u = unit roundoff of `param_dtype`: bf16 2**-8, fp32 2**-24; measured in brackets):
- loss at equal parameters: rtol 1 u. The forward is the same arithmetic in the same order (FSDP2 only moves where
  the casts happen), one rounding of the output at most. [0 in every case]
- gradients: max |diff| <= 16 u * max |ref| per tensor: a different order of up to 6 additions at each adapted
  input, each rounded to the compute dtype (<= 5 u), at 2 layers. The first step, where the adapter terms are
  exactly 0 (B = 0), is bit-equal. [bf16: 2.1-2.7 u; fp32: 6 u]
- updated parameters from the same gradients: 0 (AdamW on the same fp32 numbers, elementwise). [0]
- free-running loss curve: rtol 2**-8. [bf16: <= 6e-5; fp32: 1e-7]

The last test runs the app itself (`python -m memfit.train trainer=fsdp trainer.devices=2`, Lightning's loop with its
data, clipping and LR schedule) and checks it the same way (same order, teacher-forced) from a probe callback.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conftest import ROOT, TASK_FAST
from spawn import spawn

WORLD, STEPS, BATCH, SEQ = 2, 3, 4, 16  # global batch BATCH (BATCH // WORLD per rank) x SEQ tokens
MODEL = ["model.pretrained=false", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
         "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2"]
COMPOSITIONS: dict[str, list[str]] = {
    "lora-dense": ["adapter=lora", "storage=dense"],
    "pissa-dense": ["adapter=pissa", "storage=dense"],
    "qpissa-nf4": ["adapter=pissa", "storage=nf4"],
    "lora-neuzip": ["adapter=lora", "storage=neuzip", "storage.min_numel=0"],
    # a bf16 checkpoint: frozen base (NeuZip-coded bf16) stays bf16, the adapters become fp32 masters
    "lora-neuzip-bf16": ["adapter=lora", "storage=neuzip", "storage.min_numel=0", "model.dtype=bfloat16"],
}
LOSS_U, GRAD_U, FREE_LOSS_RTOL = 1, 16, 2.0 ** -8  # see the module docstring
U = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}  # unit roundoff


def config(overrides: list[str], out: str):
    from memfit.config import compose

    return compose("train", [*MODEL, "trainer=fsdp", "trainer.accelerator=cpu", "seed=0", *overrides,
                             "adapter.progress=false", f"paths.output_dir={out}/run", f"paths.cache_dir={out}/cache"])


def build_module(cfg):
    """The app's LMModule (model, adapter, storage, loss, optimizer factory) as `memfit.train` builds it."""
    import lightning as L
    from hydra.utils import instantiate

    from memfit.assemble import assemble
    from memfit.config import build
    from memfit.module import LMModule
    from memfit.quant.storage import build_storage
    from memfit.train import fp32_master_weights

    L.seed_everything(cfg.seed, verbose=False)
    model, tokenizer = assemble(cfg, build_storage(cfg.storage))
    fp32_master_weights(model, str(cfg.trainer.precision))
    return LMModule(model, tokenizer, loss_fn=build(cfg.loss), optimizer=instantiate(cfg.optim))


def batches(vocab: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, vocab, (BATCH, SEQ), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def rank_slice(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    n = BATCH // WORLD
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------- sharded run
def worker(rank: int, init_file: str, overrides: list[str], out: str) -> None:
    from hydra.utils import instantiate
    from torch.distributed.device_mesh import init_device_mesh

    from memfit.parallel.fsdp import full_trainable_state, shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        cfg = config(overrides, out)
        module = build_module(cfg)
        model = module.model
        names = trainable_names(model)
        strategy = instantiate(cfg.trainer.strategy)  # the app's FSDP2Strategy: its options are what shard() uses
        module.__dict__["_fsdp_root"] = shard_model(model, init_device_mesh("cpu", (WORLD,)), **strategy.shard_options)
        assert trainable_names(model) == names  # sharding neither froze nor unfroze anything
        assert all(hasattr(p, "full_tensor") for n, p in model.named_parameters() if n in names)
        frozen = {n: [t.clone() for t in _inner(p.to_local())] for n, p in model.named_parameters()
                  if not p.requires_grad and hasattr(p, "to_local")}
        opt = module.optimizer_factory(module.trainable_parameters())

        losses, grads, params = [], [], [full_trainable_state(model)]  # params[t]: before step t
        for batch in batches(model.config.vocab_size):
            loss = module.lm_loss(rank_slice(batch, rank))
            loss.backward()
            grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad})
            opt.step()
            opt.zero_grad()
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean / WORLD)
            params.append(full_trainable_state(model))  # the app's export of the trained tensors (a collective)
        for n, before in frozen.items():  # the frozen shards (dense, NF4 codes and scales, NeuZip words) are untouched
            now = _inner(model.get_parameter(n).to_local())
            assert all(torch.equal(a, b) for a, b in zip(now, before)), n
        if rank == 0:
            torch.save({"losses": torch.stack(losses), "grads": grads, "params": params,
                        "dtypes": {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}},
                       f"{out}/sharded.pt")
    finally:
        dist.destroy_process_group()


def _inner(t: torch.Tensor) -> list[torch.Tensor]:
    """The stored tensors of a (possibly subclass) shard: NF4 codes and scales, NeuZip words..., or the tensor."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [getattr(t, n) for n in names]
    return [t]


# ------------------------------------------------------------------------------------------------------ reference
def _set(model: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    mod_name, _, attr = name.rpartition(".")
    p = nn.Parameter(value, requires_grad=requires_grad)
    setattr(model.get_submodule(mod_name), attr, p)
    return p


def dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A frozen weight as a plain tensor of `dtype` (NF4 / NeuZip dequantized first: the reference's forward runs no
    storage code)."""
    t = t.detach()
    if type(t) is not torch.Tensor and hasattr(t, "dequantize"):
        t = t.dequantize()
    return t.to(dtype)


class Reference:
    """The unsharded run: fp32 master weights (`master`), `param_dtype` compute per rank slice of the global batch,
    gradients cast to `reduce_dtype` and averaged over the slices, the app's optimizer on the masters."""

    def __init__(self, cfg):
        from memfit.module import LMModule
        from memfit.parallel.fsdp import DTYPES

        module = build_module(cfg)
        self.param_dtype = DTYPES[str(cfg.trainer.strategy.param_dtype)]  # None: each parameter's own dtype
        self.reduce_dtype = DTYPES[str(cfg.trainer.strategy.reduce_dtype)]
        self.master = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
        self.compute = copy.deepcopy(module.model)  # the compute copy: frozen weights cast once, masters per step
        for n, p in list(self.compute.named_parameters()):
            if not p.requires_grad:
                _set(self.compute, n, dense(p, self.param_dtype or p.dtype), False)
        self.module = LMModule(self.compute, module.tokenizer, loss_fn=module.loss_fn)
        self.opt = module.optimizer_factory(list(self.master.values()))

    def in_fsdp_order(self) -> Reference:
        """A copy whose adapter layers take their input through an identity autograd node, as FSDP2 does for every
        unit's inputs: each layer's input gradient is then summed (base + adapter) before it joins the other
        consumers of the same tensor (q/k/v, gate/up), the order in which the sharded run adds them."""
        from memfit.adapters import adapter_layers

        other = copy.deepcopy(self)
        for layer in adapter_layers(other.compute).values():
            layer.register_forward_pre_hook(_own_input_node)
        return other

    def loss_and_grads(self, per_rank: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean of the ranks' losses and the averaged gradients; `per_rank`: each rank's batch."""
        total = {n: torch.zeros_like(p, dtype=self.reduce_dtype or p.dtype) for n, p in self.master.items()}
        losses = []
        for batch in per_rank:
            live = {n: _set(self.compute, n, p.detach().to(self.param_dtype or p.dtype), True)
                    for n, p in self.master.items()}
            loss = self.module.lm_loss(batch)
            loss.backward()
            for n, p in live.items():
                total[n] += p.grad.to(total[n].dtype)
            losses.append(loss.detach().float())
        n_ranks = len(per_rank)
        return torch.stack(losses).mean(), {n: (total[n] / n_ranks).to(p.dtype) for n, p in self.master.items()}

    def step(self, grads: dict[str, torch.Tensor], clip: float | None = None,
             scheduler: Any = None) -> dict[str, torch.Tensor]:
        """The optimizer step on the masters with these gradients (clipped by total norm, then the LR scheduler's
        step, where given: what Lightning does)."""
        for n, p in self.master.items():
            p.grad = grads[n].clone()
        if clip:
            torch.nn.utils.clip_grad_norm_(list(self.master.values()), clip)
        self.opt.step()
        self.opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        return {n: p.detach().clone() for n, p in self.master.items()}

    def load(self, params: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.master.items():
                p.copy_(params[n])


def _own_input_node(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.view_as(a) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def teacher_forced(ref: Reference, got: dict, loss_rtol: float, grad_rtol: float, what: str) -> dict[str, float]:
    """At every step: loss and gradients at the sharded run's parameters (the reference's own, checked equal), then
    the optimizer applied to the SHARDED run's gradients must give the sharded run's updated parameters exactly."""
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0}
    for n, p in ref.master.items():
        assert torch.equal(got["params"][0][n], p), n  # the same model on every rank and here
    for t, batch in enumerate(batches(ref.compute.config.vocab_size)):
        loss, grads = ref.loss_and_grads([rank_slice(batch, r) for r in range(WORLD)])
        rel = _max_diff(got["losses"][t], loss) / float(loss)
        worst["loss"] = max(worst["loss"], rel)
        assert rel <= loss_rtol, f"{what}: step {t} loss {float(got['losses'][t])} vs {float(loss)}"
        for n, r in grads.items():
            rel = _max_diff(got["grads"][t][n], r) / max(float(r.abs().max()), 1e-30)
            worst["grad"] = max(worst["grad"], rel)
            assert rel <= grad_rtol, f"{what}: step {t} gradient of {n}: max |diff| / max |ref| = {rel:.3g}"
        for n, r in ref.step(got["grads"][t]).items():
            d = _max_diff(got["params"][t + 1][n], r)
            worst["param"] = max(worst["param"], d)
            assert d == 0, f"{what}: step {t} updated {n} differs by {d:.3g} from the same update unsharded"
    return worst


def check_against_reference(cfg, got: dict) -> dict[str, float]:
    """The comparisons of the module docstring; returns the largest differences seen (relative for losses and
    gradients, absolute for parameters)."""
    plain = Reference(cfg)
    ordered, free = plain.in_fsdp_order(), copy.deepcopy(plain)
    assert set(got["dtypes"]) == set(plain.master)  # the same trainable set: no frozen weight trained
    assert set(got["dtypes"].values()) == {torch.float32}  # fp32 master weights
    u = U[plain.param_dtype or torch.float32]
    worst = {f"same_order_{k}": v for k, v in teacher_forced(ordered, got, 0.0, 0.0, "same order").items()}
    worst.update(teacher_forced(plain, got, LOSS_U * u, GRAD_U * u, "autograd order"))
    for n, r in ordered.master.items():
        assert _max_diff(r, got["params"][0][n]) > 0, f"{n} was not trained (the comparison would be vacuous)"
    free_losses = []
    for batch in batches(free.compute.config.vocab_size):
        loss, grads = free.loss_and_grads([rank_slice(batch, r) for r in range(WORLD)])
        free.step(grads)
        free_losses.append(loss)
    free_loss = torch.stack(free_losses)
    worst["free_loss"] = float(((got["losses"] - free_loss).abs() / free_loss).max())
    assert worst["free_loss"] <= FREE_LOSS_RTOL, (got["losses"].tolist(), free_loss.tolist())
    return worst


def run_case(tmp_path, overrides: list[str]) -> dict[str, float]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required for the FSDP2 test")
    out = str(tmp_path)
    with pytest.MonkeyPatch.context() as mp:  # the workers' rendezvous address, not left in the test process
        mp.setenv("MASTER_ADDR", os.environ.get("MASTER_ADDR", "127.0.0.1"))
        spawn(worker, (str(tmp_path / "init"), overrides, out), WORLD)
    got = torch.load(f"{out}/sharded.pt", weights_only=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same CPU kernels, for the bit-equality checks
    try:
        return check_against_reference(config(overrides, out), got)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_default_fsdp_matches_unsharded_reference(tmp_path, name):
    """The app's default FSDP settings (bf16 compute, fp32 reduce) on 2 ranks vs the emulated unsharded run."""
    from memfit.config import compose

    defaults = compose("train", ["trainer=fsdp"]).trainer.strategy
    assert (defaults.param_dtype, defaults.reduce_dtype) == ("bfloat16", "float32")  # what this test is about
    print(name, run_case(tmp_path, COMPOSITIONS[name]))


def test_fp32_fsdp_is_exact(tmp_path):
    """param_dtype=float32: sharding alone must not change the numbers (QPiSSA on NF4, the most sharding code)."""
    print(run_case(tmp_path, [*COMPOSITIONS["qpissa-nf4"], "trainer.strategy.param_dtype=float32"]))


# ------------------------------------------------------------------------------------------------- the app itself
APP = ["trainer.devices=2", "data.batch_size=4", "trainer.max_steps=3", "trainer.limit_val_batches=0",
       "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "eval.before=false",
       "eval.test=false", "print_summary=false", "logger=none", "callbacks=none", *TASK_FAST,
       "trainer.gradient_clip_val=0.25"]  # the gradient norm is ~0.65 here: clipping active at every step


def test_app_two_ranks_default_fsdp_matches_reference(tmp_path):
    """`python -m memfit.train trainer=fsdp trainer.devices=2` (the app's Lightning loop: its data, default FSDP
    dtypes, gradient clipping (at 0.25, so that it acts), warm-up/cosine LR, AdamW) with QPiSSA on NF4. A probe
    callback records each rank's batches, the gradients before clipping and the parameters around every step. The
    reference (same order, see the module docstring) must reproduce each step's loss and gradients exactly at the
    sharded run's parameters, and, clipping and stepping those gradients, the updated parameters up to the clip
    factor's rounding: Lightning computes the total gradient norm from the shards (another fp32 summation order),
    which scales the clipped gradient by (1 + O(u_fp32)); Adam's update m / sqrt(v) is invariant to that scale except
    through eps, so the parameters may differ by a few fp32 ulps of the update: atol = lr * 2**-20 per step.
    [measured: 0]"""
    from hydra.utils import instantiate

    overrides = [*COMPOSITIONS["qpissa-nf4"], *APP]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "helpers"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "memfit.train", *MODEL, "trainer=fsdp", "trainer.accelerator=cpu", "seed=0",
           *overrides, "adapter.progress=false", f"hydra.run.dir={tmp_path}/run", f"paths.output_dir={tmp_path}/run",
           f"paths.cache_dir={tmp_path}/cache", "+callbacks.probe._target_=fsdp_probe.Probe",
           f"+callbacks.probe.path={tmp_path}/probe.pt"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = torch.load(tmp_path / "probe.pt", weights_only=False)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(len(r["batches"]) == 2 for r in rows)
    assert not torch.equal(rows[0]["batches"][0]["input_ids"][:1], rows[0]["batches"][1]["input_ids"][:1])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = config(overrides, str(tmp_path))
        ref = Reference(cfg).in_fsdp_order()
        assert (ref.param_dtype, ref.reduce_dtype) == (torch.bfloat16, torch.float32)  # the app's defaults
        scheduler = instantiate(cfg.scheduler)(ref.opt)
        clip = float(cfg.trainer.gradient_clip_val)
        for n, p in ref.master.items():
            assert torch.equal(rows[0]["before"][n], p), n  # the app's model on every rank is the one built here
        worst = 0.0
        clipped = 0
        for t, row in enumerate(rows):
            ref.load(row["before"])  # teacher forcing (checked below against the reference's own update)
            loss, grads = ref.loss_and_grads(row["batches"])
            assert torch.equal(loss, torch.tensor(row["losses"]).mean()), (t, float(loss), row["losses"])
            for n, r in grads.items():
                assert torch.equal(row["grads"][n], r), f"step {t + 1} gradient of {n}"
            assert row["lr"] == ref.opt.param_groups[0]["lr"]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in row["grads"].values()]))
            clipped += bool(norm > clip)
            atol = ref.opt.param_groups[0]["lr"] * 2.0 ** -20
            for n, r in ref.step(row["grads"], clip, scheduler).items():
                d = _max_diff(row["after"][n], r)
                worst = max(worst, d)
                assert d <= atol, f"step {t + 1} updated {n}: max |diff| {d:.3g} > {atol:.3g}"
                if t + 1 < len(rows):
                    assert torch.equal(rows[t + 1]["before"][n], row["after"][n])
        for n in ref.master:
            assert _max_diff(rows[-1]["after"][n], rows[0]["before"][n]) > 0, f"{n} was not trained"
        assert clipped == len(rows)  # the clipping path was exercised
        print("largest parameter difference", worst)
    finally:
        torch.set_num_threads(threads)
