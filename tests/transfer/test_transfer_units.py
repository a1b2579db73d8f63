"""Trans-LoRA building blocks against independent references: MMD (closed forms, float64 numpy), the filter rule and
rejection sampling, list prompts, batched generation/scoring vs unbatched loops, token-level KL, PCA, list documents."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from memfit.transfer.mmd import median_bandwidth, mmd2, pca_2d
from memfit.transfer.synthesize import check_seeds, keep_rule, list_prompt, parse_item, rejection_sample


# ------------------------------------------------------------------------------------------------------------ MMD
def test_mmd_linear_kernel_is_mean_difference():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.normal(1.0, 2.0, size=(40, 5))
    ref = float(np.sum((x.mean(0) - y.mean(0)) ** 2))
    assert mmd2(torch.tensor(x), torch.tensor(y), "linear", unbiased=False) == pytest.approx(ref, rel=1e-12)


def test_mmd_rbf_two_points_closed_form():
    x, y = torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0, -1.0]])
    sigma = 1.7
    ref = 2 - 2 * math.exp(-13.0 / (2 * sigma**2))
    assert mmd2(x, y, "rbf", sigma, unbiased=False) == pytest.approx(ref, rel=1e-12)


def test_mmd_unbiased_matches_float64_loops_and_median_bandwidth():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(9, 3))
    z = np.concatenate([x, y])
    d = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    sigma = float(np.median(d))
    assert median_bandwidth(torch.tensor(x), torch.tensor(y)) == pytest.approx(sigma, rel=1e-12)

    def k(a, b):
        return math.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))

    xx = sum(k(x[i], x[j]) for i in range(12) for j in range(12) if i != j) / (12 * 11)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(a, b) for a in x for b in y) / (12 * 9)
    assert mmd2(torch.tensor(x), torch.tensor(y)) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_mmd_gaussians_population_closed_form():
    """X ~ N(mu1, s^2 I), Y ~ N(mu2, s^2 I), RBF(sigma): MMD^2 = 2 c (1 - exp(-|dmu|^2 / (2 (sigma^2 + 2 s^2)))),
    c = (sigma^2 / (sigma^2 + 2 s^2))^(d/2)."""
    g = torch.Generator().manual_seed(0)
    d, s, sigma, n = 2, 1.0, 1.5, 3000
    mu = torch.tensor([1.0, -0.5])
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * s
    y = torch.randn(n, d, generator=g, dtype=torch.float64) * s + mu
    v = sigma**2 + 2 * s**2
    ref = 2 * (sigma**2 / v) ** (d / 2) * (1 - math.exp(-float(mu @ mu) / (2 * v)))
    est = mmd2(x, y, "rbf", sigma)
    assert est == pytest.approx(ref, abs=0.01)
    assert abs(mmd2(x[: n // 2], x[n // 2:], "rbf", sigma)) < 0.005  # same distribution: ~0


def test_mmd_bad_input():
    with pytest.raises(ValueError, match="same dimension"):
        mmd2(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="kernel='cosine'"):
        mmd2(torch.zeros(3, 2), torch.ones(3, 2), "cosine")
    with pytest.raises(ValueError, match=">= 2 points"):
        mmd2(torch.zeros(1, 2), torch.ones(3, 2))


def test_pca_matches_covariance_eigenvalues():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    proj = pca_2d(torch.tensor(z)).numpy()
    evals = np.sort(np.linalg.eigvalsh(np.cov(z.T)))[::-1][:2]
    np.testing.assert_allclose(np.var(proj, axis=0, ddof=1), evals, rtol=1e-9)


# -------------------------------------------------------------------------------------------- prompts and filter
def test_list_prompt_and_parse():
    assert list_prompt(["a b", "c"]) == "Here are 10 examples:\n1. a b\n2. c\n3."
    assert parse_item(" x and y\n7. more", 5) == "x and y"
    assert parse_item(" x and y\n9. misnumbered", 5) == "x and y"
    assert parse_item(" multi\nOptions:\n- Yes\n7.", 5) == "multi\nOptions:\n- Yes"
    assert parse_item(" never closed", 5) is None
    assert parse_item("  \n7.", 5) is None


def test_keep_rule_is_strict():
    yes = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    no = torch.tensor([-2.0, -2.0, -1.0], dtype=torch.float64)
    assert keep_rule(yes, no).tolist() == [True, False, False]


def test_rejection_sampling_dedupes_filters_and_stops():
    stream = iter(["a1", None, "seed", "a1", "b2", "c3", "d4", "e5", "f6", "g7"] * 3)
    calls = []

    def gen(size):
        calls.append(size)
        return [next(stream) for _ in range(size)]

    def judge(xs):  # keep items whose digit is odd
        yes = torch.tensor([0.0 if int(x[1]) % 2 else -1.0 for x in xs], dtype=torch.float64)
        return yes, torch.full((len(xs),), -0.5, dtype=torch.float64)

    res = rejection_sample(gen, judge, n=3, round_size=4, max_candidates=40, exclude=["seed"])
    assert res.kept[:3] == ["a1", "c3", "e5"]
    assert res.unfiltered[:3] == ["a1", "b2", "c3"]
    assert res.invalid == 1 and res.duplicates >= 2
    assert res.stats()["acceptance_rate"] == pytest.approx(len(res.kept) / len(res.candidates))
    assert all(c <= 4 for c in calls)


def test_rejection_sampling_budget_message_reports_acceptance():
    def gen(size):
        return [f"x{random.random()}" for _ in range(size)]

    def judge(xs):
        return torch.full((len(xs),), -2.0, dtype=torch.float64), torch.full((len(xs),), -1.0, dtype=torch.float64)

    with pytest.raises(RuntimeError, match=r"kept 0 of 20 valid candidates \(acceptance rate 0\.0%.*max_candidates=20"):
        rejection_sample(gen, judge, n=5, round_size=8, max_candidates=20)


def test_rejection_sampling_partial():
    flip = iter([0.0, -2.0] * 20)

    def judge(xs):
        return torch.tensor([next(flip) for _ in xs], dtype=torch.float64), torch.full((len(xs),), -1.0,
                                                                                        dtype=torch.float64)

    gen = iter(range(1000))
    res = rejection_sample(lambda k: [f"i{next(gen)}" for _ in range(k)], judge, n=10, round_size=4,
                           max_candidates=8, allow_partial=True)
    assert len(res.kept) == 4 and res.acceptance_rate == pytest.approx(0.5)
    with pytest.raises(RuntimeError, match="kept 4 of 8"):
        flip = iter([0.0, -2.0] * 20)  # noqa: F841 - judge reads the closure's name
        rejection_sample(lambda k: [f"j{next(gen)}" for _ in range(k)], judge, n=10, round_size=4, max_candidates=8)


def test_too_few_seeds():
    with pytest.raises(ValueError, match="only 3 seed example.*synthesize.k=5"):
        check_seeds(["a", "b", "c"], 5)


def test_seed_file_task_mismatch(tmp_path):
    from memfit.transfer.pipeline import load_seeds

    f = tmp_path / "seeds.jsonl"
    f.write_text("".join(json.dumps({"input": f"x{i}", "task": "navigate"}) + "\n" for i in range(6)))
    cfg = OmegaConf.create({"task": "word_sorting", "seeds": {"file": str(f), "n": 5}, "synthesize": {"k": 5}})
    with pytest.raises(ValueError, match=r"task\(s\) \['navigate'\] but task='word_sorting'"):
        load_seeds(cfg, [])
    cfg.task = "navigate"
    assert load_seeds(cfg, []) == [f"x{i}" for i in range(6)]


# --------------------------------------------------------------------------------- generation, scoring, distill
@pytest.fixture(scope="module")
def tiny_lm():
    from memfit.models.build import from_arch
    from memfit.models.tokenizer import char_tokenizer

    tok = char_tokenizer()
    arch = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256)
    return from_arch(arch, tok, torch.float32, 3).eval(), tok


def test_batched_greedy_generation_matches_unbatched_loop(tiny_lm):
    from memfit.transfer.generate import generate_texts

    model, tok = tiny_lm
    prompts = ["Q: True and False is\nA:", "abc", "Here are 10 examples:\n1."]
    got = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=2)
    for p, g in zip(prompts, got):
        ids = tok.encode(p, add_special_tokens=False)
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
        ref = tok.decode(ids[len(tok.encode(p, add_special_tokens=False)):], skip_special_tokens=True)
        assert g == ref


def test_completion_logprobs_match_unpadded_float64(tiny_lm):
    from memfit.transfer.generate import completion_logprobs

    model, tok = tiny_lm
    prompts, comps = ["x is", "a much longer prompt here", "q"], [" yes", " no", " maybe"]
    got = completion_logprobs(model, tok, prompts, comps, batch_size=3)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        pi, ci = tok.encode(p, add_special_tokens=False), tok.encode(c, add_special_tokens=False)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([pi + ci])).logits[0].double(), -1)
        ref = sum(float(lp[len(pi) - 1 + j, t]) for j, t in enumerate(ci))
        assert float(got[i]) == pytest.approx(ref, abs=1e-4)


def test_kl_on_labels_matches_float64_reference():
    from memfit.transfer.distill import kl_on_labels

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    terms = []
    for b in range(2):
        for pos in range(4):
            if labels[b, pos + 1] != -100:
                p = torch.softmax(t[b, pos].double(), -1)
                q = torch.softmax(s[b, pos].double(), -1)
                terms.append(float((p * (p.log() - q.log())).sum()))
    assert float(kl_on_labels(s, t, labels)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert float(kl_on_labels(t, t, labels)) == pytest.approx(0.0, abs=1e-6)


def test_vocabulary_check():
    from memfit.models.build import make_tokenizer
    from memfit.transfer.distill import same_vocabulary

    char, bpe = make_tokenizer("char"), make_tokenizer("bpe", 300)
    assert same_vocabulary(char, make_tokenizer("char"))
    assert not same_vocabulary(char, bpe)


def test_discriminator_rows_and_accuracy():
    from memfit.transfer import discriminate as D

    rows = D.disc_rows(["r1"], ["s1", "s2"], "word_sorting")
    assert rows[0]["prompt"] == "r1\nIs the above question from word sorting dataset?"
    assert [r["completion"] for r in rows] == [" yes", " no", " no"]
    yes = torch.tensor([0.0, 0.0, -5.0, 0.0])
    no = torch.tensor([-1.0, 1.0, -1.0, -1.0])
    assert D.accuracy(yes, no, torch.tensor([1, 1, 0, 0])) == pytest.approx(0.5)  # right on rows 0 and 2
    (rt, st), (rh, sh) = D.split_heldout([f"r{i}" for i in range(10)], [f"s{i}" for i in range(5)], 0.2, 0)
    assert (len(rt), len(rh), len(st), len(sh)) == (8, 2, 4, 1) and not set(rt) & set(rh)


def test_text_data_list_docs():
    from memfit.data.datamodule import TextData
    from memfit.models.tokenizer import char_tokenizer

    dm = TextData(tasks="word_sorting", n_docs=40, list_docs=0.2, max_length=64)
    dm.set_tokenizer(char_tokenizer())
    docs = dm.documents()
    lists = [d for d in docs if d.startswith("Here are 10 examples:\n")]
    assert len(lists) == 10 and len(docs) == 50  # 40 / (1 - 0.2) - 40 = 10 lists
    body = lists[0].split("\n")[1:]
    assert [line.split(". ", 1)[0] for line in body] == [str(i) for i in range(1, 11)]
    assert all(line.split(". ", 1)[1].startswith("Sort the following words") for line in body)
    assert TextData(tasks="word_sorting", n_docs=40).documents() == \
        [d for d in TextData(tasks="word_sorting", n_docs=40, list_docs=0.0).documents()]
    with pytest.raises(ValueError, match="list_docs=1.5"):
        TextData(list_docs=1.5)


def test_discriminator_decides_at_the_first_differing_token():
    """p(" yes") vs p(" no") is compared where the answers differ: " y"/" n" for a character tokenizer (the shared
    leading space scores the same under both), the whole words for a tokenizer that has them as single tokens."""
    from memfit.models.tokenizer import char_tokenizer
    from memfit.transfer.discriminate import deciding_answers

    assert deciding_answers(char_tokenizer()) == (" y", " n")

    class Words:
        vocab = {" yes": 7, " no": 9}

        def encode(self, text, add_special_tokens=False):
            return [self.vocab[text]]

        def decode(self, ids):
            return {v: k for k, v in self.vocab.items()}[ids[0]]

    assert deciding_answers(Words()) == (" yes", " no")
