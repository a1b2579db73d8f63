"""The mutation campaign's data (experiments/mutation.py): which source files each module covers and the tests that
exercise them, and the survivors judged equivalent or unreachable on CPU, each with why."""

from __future__ import annotations

# module -> source files and the test selection that exercises them ("new" is added in the after phase)
MODULES: dict[str, dict] = {
    "rans": {
        "files": ["kernels/ans/__init__.py", "kernels/ans/native.py"],
        "tests": ["tests/kernels/test_ans.py", "-k", "not triton_interpreter"],
        "new": ["tests/kernels/test_mutants_rans.py"],
    },
    "fmdelta": {
        "files": ["kernels/fmdelta/__init__.py", "kernels/fmdelta/reference.py",
                  "framework/compression/container.py"],
        "tests": ["tests/kernels/test_fmdelta_codec.py", "tests/compression/test_fmdelta_container.py"],
        "new": ["tests/kernels/test_mutants_fmdelta.py"],
    },
    "neuzip": {
        "files": ["framework/quant/neuzip.py"],
        "tests": ["tests/quant/test_neuzip.py", "-k", "not run_neuzip"],
        "new": ["tests/quant/test_mutants_neuzip.py"],
    },
    "nf4": {
        "files": ["kernels/nf4/__init__.py", "framework/quant/nf4.py"],
        "tests": ["tests/quant/test_nf4.py", "tests/quant/test_nf4_linear.py", "-k",
                  "not triton_interpreter and not storage_nf4_trains"],
        "new": ["tests/quant/test_mutants_nf4.py"],
    },
    "cce": {
        "files": ["kernels/cce/__init__.py", "kernels/cce/reference.py", "framework/loss.py"],
        "tests": ["tests/kernels/test_cce_api.py", "tests/kernels/test_cce.py", "-k", "(torch or bad_input or autocast or loss_class) "
                  "and not compile and not opcheck and not triton"],
        "new": ["tests/kernels/test_mutants_cce.py"],
    },
    "adapter_inits": {
        "files": ["framework/adapters/inits.py", "framework/adapters/svd.py"],
        "tests": ["tests/adapters/test_adapters.py", "tests/adapters/test_qpissa.py", "-k", "not train_run and not end_to_end"],
        "new": ["tests/adapters/test_mutants_adapters.py"],
    },
    "fmdelta_callback": {
        "files": ["framework/callbacks/fmdelta.py"],
        "tests": ["tests/callbacks/test_fmdelta_callback.py"],
        "new": ["tests/callbacks/test_mutants_fmdelta_callback.py"],
    },
}

# survivors judged equivalent (file, line, mutation) -> why; filled in from the before-run's survivors
EQUIVALENT: dict[tuple, str] = {  # (file, line, mutation[, site index where a line has two alike])
    ("kernels/ans/__init__.py", 110, "False -> True"):
        "`compare=` of the cached decode table: ANSEncoded is never compared with ==, and a dataclass == over "
        "tensor fields raises either way",
    ("kernels/ans/__init__.py", 207, "True -> False"):
        "`copy=True` in an int32 -> int64 conversion: a dtype change always copies",
    ("kernels/ans/__init__.py", 240, "// -> /"):
        "ceil(n / lanes) >= 2**32 as a float: differs from the integer test only for more than 2**32 symbols per lane",
    ("kernels/ans/__init__.py", 240, "1 -> 2"):
        "not reachable in a test: moves a 2**32 limit (symbols per lane, lanes) to 2**33; reaching either needs over "
        "4e9 symbols or 4e9 lanes (32 GB of lane tables)",
    ("kernels/ans/__init__.py", 316, "256 -> 257"):
        "torch.bincount fallback (no C++ compiler) with one extra zero bin: the table is cut after the last used "
        "symbol, so the result is the same",
    ("kernels/ans/native.py", 108, "1 -> 2"):
        "one more zero word of padding after the stream: the decoder never reads past the first pad word",
    ("kernels/fmdelta/__init__.py", 68, "% -> //"):
        "not reachable on CPU: `_use_gpu_kernels` returns False for CPU tensors before this line",
    ("kernels/fmdelta/__init__.py", 185, "64 -> 65"):
        "a valid block needs at most ceil(block * (W - 1) / 64) words, below both bounds (W <= 64); a crafted table "
        "between the bounds is rejected either way (here, or by the decoder's consistency check)",
    ("kernels/fmdelta/reference.py", 24, "< -> <="):
        "msb64 is only called on positive magnitudes (zeros are replaced by ones first): mag == 0 never occurs",
    ("kernels/fmdelta/reference.py", 100, "2 -> 3"):
        "one more zero word of padding: an element spans at most two words, so the third is never read",
    ("framework/quant/neuzip.py", 287, "is not -> is"):
        "not reachable on CPU: the Triton decode branch (CUDA, or use_triton=True under the Triton interpreter), "
        "outside this CPU selection",
    ("framework/quant/nf4.py", 167, "== -> !="):
        "not reachable on CPU: `_use_fused` starts with `a.is_cuda and ...`, so the rest of the condition is never evaluated on CPU",
    ("framework/quant/nf4.py", 167, "<= -> <"):
        "not reachable on CPU: `_use_fused` starts with `a.is_cuda and ...`, so the rest of the condition is never evaluated on CPU",
    ("framework/quant/nf4.py", 167, "% -> //"):
        "not reachable on CPU: `_use_fused` starts with `a.is_cuda and ...`, so the rest of the condition is never "
        "evaluated on CPU",
    ("framework/quant/nf4.py", 176, "is not -> is"):
        "not reachable on CPU: inside the fused-kernel branch of nf4_mm (CUDA only)",
    ("framework/quant/nf4.py", 179, "1 -> 2"):
        "not reachable on CPU: inside the fused-kernel branch of nf4_mm (CUDA only)",
    ("kernels/nf4/__init__.py", 127, "is not -> is"):
        "not reachable on CPU: only defines the Triton kernel, which runs on CUDA or under the Triton interpreter",
    ("kernels/cce/reference.py", 73, "0 -> 1", 32):  # e.shape[0] (the c.shape[0] one is killed)
        "in grad_torch `n` only sets the vocabulary chunk width (budget // n); every chunking gives the same exact "
        "gradients",
    ("framework/quant/nf4.py", 173, "0 -> 1"):
        "not reachable on CPU: `n` (and `width` for trans=True) only feed the fused CUDA kernel's selection and call: unused on CPU",
    ("kernels/ans/__init__.py", 240, ">= -> >"):
        "not reachable in a test: the per-lane limit at exactly 2**32 symbols (over 4e9 symbols)",
    ("kernels/ans/__init__.py", 240, "-x -> x"):
        "not reachable in a test: drops the per-lane limit, which only fires beyond 2**32 symbols per lane",
    ("kernels/ans/__init__.py", 316, "is not -> is"):
        "torch.bincount instead of the C++ histogram: the same counts (only slower)",
    ("kernels/fmdelta/__init__.py", 24, "<< -> >>"):
        "not reachable on CPU: GPU_SEGMENT is only the default segment size for CUDA tensors",
    ("kernels/fmdelta/__init__.py", 24, "26 -> 27"):
        "not reachable on CPU: GPU_SEGMENT is only the default segment size for CUDA tensors",
    ("kernels/fmdelta/__init__.py", 68, "0 -> 1"):
        "not reachable on CPU: `_use_gpu_kernels` returns False for CPU tensors before this line",
    ("kernels/fmdelta/__init__.py", 118, "-x -> x"):
        "not reachable on CPU: the segment default for CUDA tensors (`if cuda`)",
    ("kernels/fmdelta/__init__.py", 185, "// -> /"):
        "block_words are integers: bw > (b*W + 63) / 64 holds exactly when bw > (b*W + 63) // 64",
    ("framework/quant/neuzip.py", 50, "0 -> 1"):
        "`_Store.version` only feeds equality tests against a value read from the same store (prefetch "
        "staleness); its starting value does not matter",
    ("framework/quant/neuzip.py", 239, "and -> or"):
        "with param_dtype None the mutant calls dense.to(None), and with the weight's own dtype dense.to(dtype): "
        "both return the tensor unchanged",
    ("framework/quant/neuzip.py", 246, "1 -> 2"):
        "the all-gather hands back 1 tensor (FSDP2's 1-rank shortcut) or 5-6 (one per compressed part), never 2",
    ("framework/quant/neuzip.py", 292, "False -> True"):
        "ans_decode's CPU path validates whatever `validate` says (the flag only skips host syncs on CUDA)",
    ("framework/adapters/svd.py", 45, "== -> !="):
        "whether a 2-D weight gets a batch dimension of 1 (and 3-D gets a second one) does not matter: every step is "
        "batched over the leading dimensions and the result is un-batched to match",
    ("framework/adapters/svd.py", 45, "2 -> 3"):
        "whether a 2-D weight gets a batch dimension of 1 (and 3-D gets a second one) does not matter: every step is "
        "batched over the leading dimensions and the result is un-batched to match",
    ("framework/adapters/svd.py", 47, "-1 -> 1"):
        "picks which side's Gram matrix is decomposed: either side gives the exact top-r triplets (the larger one "
        "only costs more)",
    ("framework/adapters/svd.py", 47, "1 -> 2"):
        "picks which side's Gram matrix is decomposed: either side gives the exact top-r triplets (the larger one "
        "only costs more)",
    ("framework/adapters/svd.py", 47, ">= -> >"):
        "for a square weight both Gram matrices have the same size, and either side gives the same top-r triplets "
        "(the tests compare with float64 SVD within 1e-5 for square weights too)",
    ("framework/adapters/svd.py", 28, "-1 -> 1", 53):
        "`evals.flip(1)`: the eigenvalues are always a (b, k) stack here (`_finish` is only "
        "called from rayleigh_ritz on 3-D inputs), so dim 1 is dim -1 (the same mutation of `evecs.flip` is killed)",
    ("framework/adapters/svd.py", 72, "2 -> 3"):
        "a third Cholesky-QR pass over an already orthonormal basis returns it unchanged (to rounding)",
}
# survivors of the holdout sample, with what is known about them
HOLDOUT_NOTES: dict[tuple, str] = {
    ("kernels/ans/__init__.py", 73, "* -> /"):
        "(ci / m) // total is 0, so every used symbol starts at 1 slot and the greedy adds all units: adding by "
        "largest gain is exact for this separable concave objective, so the same optimum comes out (tables could "
        "differ only where two tables cost the same; no test found one), at the price of up to 2**prob_bits steps",
}
