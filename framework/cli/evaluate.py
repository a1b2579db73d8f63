"""Score a model without training: greedy exact match per task and loss, on the task suite's test split or on JSONL
files, written per item to a predictions file.

    python -m memfit.cli.evaluate model=llama model.path=DIR model.dtype=float32       # an HF checkpoint directory
    python -m memfit.cli.evaluate ckpt=RUN/checkpoints/last.ckpt                      # a run's Lightning checkpoint
    python -m memfit.cli.evaluate model=llama model.path=BASE adapter_path=ADAPTER    # a base + a LoRA adapter
    python -m memfit.cli.evaluate ... data=jsonl data.test_file=items.jsonl [data.template=suite]

Scoring is the app's own test step (`LMModule.test_step` through `Trainer.test`) on the app's data modules (same
prompt template, tokenisation and batching), so a model saved by a run scores exactly the run's test/acc and
test/loss under the same data settings. Nothing is trained and no training file is needed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from memfit.assemble import assemble
from memfit.config import CONF_DIR, build
from memfit.module import LMModule
from memfit.report import print_evaluation
from memfit.runs import find_config, load_full_state, load_weights, run_model

log = logging.getLogger(__name__)

PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_[AB])\.weight")


def peft_adapter(path: Path) -> tuple[DictConfig, dict[str, torch.Tensor]]:
    """A peft LoRA directory (adapter_config.json + adapter_model.safetensors, as `export_peft` writes) as an
    `adapter` config node and the factors under the model's parameter names."""
    from safetensors.torch import load_file

    conf = json.loads((path / "adapter_config.json").read_text())
    if conf.get("peft_type", "LORA") != "LORA" or isinstance(conf.get("target_modules"), str):
        raise ValueError(f"adapter_path={str(path)!r}: only LoRA adapters with a list of target_modules are supported")
    adapter = OmegaConf.merge(OmegaConf.load(CONF_DIR / "adapter" / "lora.yaml"), {
        "rank": conf["r"], "alpha": conf["lora_alpha"], "targets": list(conf["target_modules"]),
        "rank_pattern": conf.get("rank_pattern") or {}, "alpha_pattern": conf.get("alpha_pattern") or {},
        "rslora": bool(conf.get("use_rslora", False)), "seed": 0, "progress": False,
    })
    weights = {}
    for key, value in load_file(path / "adapter_model.safetensors").items():
        m = PEFT_KEY.fullmatch(key)
        if not m:
            raise ValueError(f"adapter_path={str(path)!r}: unexpected tensor {key!r} (not a LoRA factor)")
        weights[f"{m[1]}.{m[2]}"] = value
    return adapter, weights


def load_model(cfg: DictConfig) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for the evaluation config: `ckpt`, or `model` (+ `adapter_path`), built by `assemble`."""
    if cfg.get("ckpt"):
        run_cfg: Any = OmegaConf.load(cfg.get("ckpt_config") or find_config(cfg.ckpt))
        return run_model(run_cfg, load_full_state(cfg.ckpt), f"ckpt={cfg.ckpt}")
    path = cfg.get("adapter_path")
    if not path:
        return assemble(cfg)
    p = Path(path).expanduser()
    if p.is_dir() and (p / "adapter_config.json").is_file():
        adapter, weights = peft_adapter(p)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.adapter = adapter  # the adapter's own shape, whatever the adapter group says
    elif p.is_file() and p.suffix == ".safetensors":  # trainable tensors by parameter name (RUN/trainable.safetensors)
        from safetensors.torch import load_file

        weights = load_file(p)
    else:
        raise FileNotFoundError(f"adapter_path={str(path)!r} is neither a peft adapter directory (adapter_config.json) "
                                "nor a .safetensors file of trainable tensors")
    model, tokenizer = assemble(cfg)
    expect = [n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
    if not expect:
        raise ValueError(f"adapter_path={str(path)!r} needs an adapter in the model: set the adapter the weights "
                         "were trained with (e.g. adapter=lora adapter.rank=8)")
    load_weights(model, weights, f"adapter_path={path}", expect)
    return model, tokenizer


def make_data(cfg: DictConfig, tokenizer: Any) -> Any:
    """The configured data module with only its test split: no training or validation data is built or needed."""
    data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=False)
    assert isinstance(data, dict)
    if "n_train" in data:  # task suite: the test split does not depend on the other splits' sizes
        data.update(n_train=0, n_val=0)
    if "train_file" in data:
        data.update(train_file=None, val_file=None)
    datamodule = instantiate(OmegaConf.create(data))
    datamodule.set_tokenizer(tokenizer)
    if not datamodule.has_split("test"):
        field = "data.test_file" if "test_file" in data else "data.n_test"
        raise ValueError(f"nothing to score: {field} is not set (a JSONL file: data=jsonl data.test_file=FILE)")
    return datamodule


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the configured model on the configured test data; returns {metrics, predictions} and writes the
    predictions (one JSON object per item) to `cfg.predictions`."""
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(cfg)
    datamodule = make_data(cfg, tokenizer)
    module = LMModule(model, tokenizer, loss_fn=build(cfg.loss), generate_batches=cfg.generate_batches,
                      task_names=getattr(datamodule, "tasks", None))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    metrics = {k: float(v) for k, v in trainer.test(module, datamodule=datamodule, verbose=False)[0].items()}
    prompts = datamodule.splits["test"]["prompt"]
    predictions = [{"task": p["task"], "prompt": prompt, "prediction": p["prediction"], "target": p["target"],
                    "correct": p["prediction"] == p["target"].strip()} for p, prompt in zip(module.predictions, prompts)]
    if cfg.get("predictions"):
        out = Path(cfg.predictions)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as fh:
            fh.writelines(json.dumps(p) + "\n" for p in predictions)
        out.with_name("metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("wrote %d predictions to %s", len(predictions), out)
    if cfg.get("print_summary", True):
        print_evaluation(metrics, predictions, title=describe(cfg))
    return {"metrics": metrics, "predictions": predictions}


def describe(cfg: DictConfig) -> str:
    """What was scored on what, for the summary's title."""
    model = f"ckpt={cfg.ckpt}" if cfg.get("ckpt") else f"model={cfg.model.get('path') or cfg.model.get('name')}"
    if cfg.get("adapter_path"):
        model += f" + adapter {cfg.adapter_path}"
    files = cfg.data.get("test_file")
    data = f"data.test_file={files}" if files else f"the generated test split of {cfg.data.get('tasks')}"
    return f"{model} on {data}"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> float:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return evaluate(cfg)["metrics"].get("test/acc", float("nan"))


if __name__ == "__main__":
    main()
