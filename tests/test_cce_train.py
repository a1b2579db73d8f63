"""Training a tiny model with loss=cce and loss=torch through memfit.train.run gives the same loss curve."""

from __future__ import annotations

import lightning as L

from memfit.config import compose


class StepLosses(L.Callback):
    """Every training step's loss, in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_cce_and_torch_loss_curves_agree_for_50_steps(tmp_path, monkeypatch):
    import memfit.train as train_mod

    curves = {}
    for loss in ("cce", "torch"):
        rec = StepLosses()
        orig = train_mod.make_callbacks
        monkeypatch.setattr(train_mod, "make_callbacks", lambda cfg, *a, rec=rec, orig=orig, **k: orig(cfg, *a, **k) + [rec])
        cfg = compose("train", [
            f"loss={loss}", "model.pretrained=false", "trainer.max_steps=50", "eval.before=false", "eval.test=false",
            "logger=none", "callbacks=none", f"paths.output_dir={tmp_path}/{loss}", f"paths.cache_dir={tmp_path}/cache",
            "model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=1",
            "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=1",
            "data.batch_size=4", "data.n_train=200", "data.n_val=8", "data.n_test=8", "trainer.accelerator=cpu",
            "trainer.val_check_interval=1000", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "print_summary=false",
        ])
        train_mod.run(cfg)
        monkeypatch.undo()
        curves[loss] = rec.losses
    assert len(curves["cce"]) == len(curves["torch"]) == 50
    assert curves["torch"][-1] < curves["torch"][0] - 0.5  # it actually trained
    diffs = [abs(a - b) for a, b in zip(curves["cce"], curves["torch"])]
    assert max(diffs) < 1e-3, max(diffs)
