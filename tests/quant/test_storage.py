"""Storage formats as configured objects (memfit.quant.storage): built from the `storage` config group's `_target_`,
or by name from run configs written before it; each says what it needs (quantizer, callbacks, run checks), and the
LightningModule names none of them."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from torch import nn

from conftest import ROOT
from memfit.config import compose
from memfit.quant.nf4 import NF4Tensor
from memfit.quant.storage import NeuZipStorage, NF4Storage, Storage, build_storage


@pytest.mark.parametrize("name,cls", [("dense", Storage), ("nf4", NF4Storage), ("neuzip", NeuZipStorage),
                                      ("neuzip_lossy", NeuZipStorage)])
def test_config_group_and_legacy_name_build_the_same_object(name, cls):
    node = compose("train", [f"storage={name}", "paths.output_dir=/tmp/x"]).storage
    new = build_storage(node)
    legacy = build_storage({k: v for k, v in OmegaConf.to_container(node).items() if k != "_target_"})
    assert type(new) is cls and type(legacy) is cls and new.settings() == legacy.settings() and new.name == name


def test_unknown_storage_field_fails_at_start(fast_cfg):
    from memfit.train import validate

    with pytest.raises(InstantiationException, match="blocksize"):
        validate(fast_cfg("storage=nf4", "+storage.blocksize=32"))


def test_nf4_quantizer_is_the_stored_round_trip():
    layer = nn.Linear(128, 64).to(torch.bfloat16)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q = NF4Storage(block_size=128, double_quant=True).quantizer()(layer)(w)
    ref = NF4Tensor.from_dense(w.to(torch.bfloat16), block_size=128, double_quant=True).dequantize().float()
    assert torch.equal(q, ref)
    assert Storage().quantizer() is None and NeuZipStorage().quantizer() is None  # lossless: nothing to fit


def test_lossy_neuzip_needs_a_supported_width():
    with pytest.raises(ValueError, match="mantissa_bits in \\[0, 1, 3\\], got 2"):
        NeuZipStorage(name="neuzip_lossy", mantissa_bits=2)


def test_compressed_training_brings_its_callback_and_counts(fast_cfg):
    from memfit.quant.neuzip_train import CompressedTraining
    from memfit.train import run

    res = run(fast_cfg("adapter=none", "storage=neuzip", "storage.min_numel=0", "storage.train_compressed=true",
                       "trainer.gradient_clip_val=null", "optim=sgd", "trainer.max_steps=2", "eval.test=false"))
    hooks = [c for c in res["callbacks"] if isinstance(c, CompressedTraining)]
    assert len(hooks) == 1 and hooks[0].inner.optimizer is not None
    model = res["module"].model
    assert res["trainable_params"] == res["total_params"] == sum(p.numel() for p in model.parameters())


def test_module_names_no_storage():
    """The LightningModule asks nothing of a storage format by name (formats bring their callbacks)."""
    text = (ROOT / "framework" / "module.py").read_text().lower()
    assert "neuzip" not in text and "nf4" not in text
