"""Build or load causal LMs: a local HF checkpoint directory, or a Llama-architecture model from a config.

Nothing is downloaded: `path` must be a local directory, and `model=tiny` builds its tokenizer and weights locally
(optionally pre-trained by the framework's own recipe and cached; see `memfit.models.pretrain`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memfit.config import check_choice
from memfit.models.tokenizer import TOKENIZERS, bpe_tokenizer, char_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    check_choice("model.dtype", name, DTYPES)
    return DTYPES[name]


def make_tokenizer(kind: str, vocab_size: int | None = None) -> PreTrainedTokenizerBase:
    check_choice("model.tokenizer", kind, TOKENIZERS)
    if kind == "char":
        return char_tokenizer()
    from memfit.data.tasks import TASKS, generate_split

    corpus = [f"Q: {e['input']}\nA: {e['target']}" for t in TASKS for e in generate_split(t, "train", 300, seed=1234)]
    return bpe_tokenizer(corpus, vocab_size or 512)


def load_local(path: str | Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an HF causal LM and its tokenizer from a local directory, with a clear error when it is not one."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"model.path={str(path)!r} does not exist or is not a directory (a local HF checkpoint)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path={str(p)!r} has no config.json: not an HF checkpoint directory")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True).train()
    tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def from_arch(arch: dict[str, Any], tok: PreTrainedTokenizerBase, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    """A freshly initialised model (deterministic by seed) whose vocabulary matches `tok`."""
    arch = dict(arch)
    model_type = arch.pop("model_type", "llama")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **arch,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).train()


def build_model(cfg: DictConfig, cache_dir: str | Path = ".cache/memfit") -> tuple[PreTrainedModel, Any]:
    """`cfg` is the `model` config group: `path` (local checkpoint) or `arch` (+ `pretrained` recipe)."""
    dtype = resolve_dtype(cfg.get("dtype", "float32"))
    if cfg.get("path"):
        return load_local(cfg.path, dtype)
    if cfg.get("arch") is None:
        raise ValueError("model config needs either `path` (a local HF checkpoint directory) or `arch`")
    if cfg.get("pretrained"):
        from memfit.models.pretrain import ensure_pretrained

        return load_local(ensure_pretrained(cfg, cache_dir), dtype)
    tok = make_tokenizer(cfg.get("tokenizer", "char"), cfg.get("tokenizer_vocab"))
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    return from_arch(arch, tok, dtype, int(cfg.get("init_seed", 0))), tok
