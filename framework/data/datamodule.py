"""LightningDataModules on `datasets`: the generated task suite, a user's JSONL files, and packed plain text."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
from datasets import Dataset

from memfit.config import check_choice
from memfit.data.collate import Collator, encode_pair, format_prompt
from memfit.data.loader import ResumableLoader
from memfit.data.tasks import generate_split, resolve_tasks

log = logging.getLogger(__name__)


class LMDataModule(L.LightningDataModule):
    """Shared plumbing: a tokenizer set by the training entry, `datasets` splits, resumable loaders."""

    def __init__(self, batch_size: int = 16, eval_batch_size: int | None = None, max_length: int = 256,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_length, self.seed, self.num_workers = max_length, seed, num_workers
        self.tokenizer: Any = None
        self.splits: dict[str, Dataset] = {}

    def set_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def build_splits(self) -> dict[str, Dataset]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError("call set_tokenizer(model_tokenizer) before using the data module")
        if not self.splits:
            self.splits = self.build_splits()

    def _loader(self, split: str, shuffle: bool) -> ResumableLoader:
        self.setup()
        if split not in self.splits:
            raise ValueError(f"this data module has no {split!r} split (has: {', '.join(self.splits)})")
        bs = self.batch_size if shuffle else self.eval_batch_size
        return ResumableLoader(self.splits[split], bs, Collator(self.tokenizer.pad_token_id), shuffle=shuffle,
                               seed=self.seed, drop_last=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> ResumableLoader:
        loader = self._loader("train", shuffle=True)
        trainer = self.trainer
        if trainer is not None:  # resuming mid-epoch: skip what the checkpointed run had already consumed
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            if done and done < len(loader):
                loader.skip(done)
        return loader

    def has_split(self, split: str) -> bool:
        """Whether the module holds examples for `split` (the app tests only when there is a test split)."""
        self.setup()
        return split in self.splits

    def val_dataloader(self) -> ResumableLoader | list:
        """No validation split (e.g. JSONL train + test files only): an empty list, which Lightning skips."""
        if not self.has_split("val"):
            return []
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> ResumableLoader:
        return self._loader("test", shuffle=False)


class PromptCompletionData(LMDataModule):
    """Rows with prompt/completion text; the loss covers completion tokens only unless `completion_only=False`."""

    def __init__(self, completion_only: bool = True, **kw):
        super().__init__(**kw)
        self.completion_only = completion_only

    def _encode(self, rows: list[dict[str, str]]) -> Dataset:
        out, cut = [], 0
        for r in rows:
            enc = encode_pair(self.tokenizer, r["prompt"], r["completion"], self.max_length, self.completion_only)
            cut += enc.pop("prompt_cut") > 0
            enc.update(target=r.get("target", r["completion"].strip()), task=r.get("task", "default"), prompt=r["prompt"])
            out.append(enc)
        if cut:
            log.warning("%d of %d prompts do not fit data.max_length=%d tokens with their answer and lose their start; "
                        "raise data.max_length (up to the model's context) to keep them whole", cut, len(rows),
                        self.max_length)
        return Dataset.from_list(out)


class TaskSuiteData(PromptCompletionData):
    """The generated BBH-format suite (`memfit.data.tasks`), deterministic by seed."""

    def __init__(self, tasks: str | list[str] = "boolean_expressions", n_train: int = 1000, n_val: int = 100,
                 n_test: int = 200, fewshot: int = 0, difficulty: dict[str, dict] | None = None, **kw):
        super().__init__(**kw)
        self.tasks = resolve_tasks(tasks if isinstance(tasks, str) else list(tasks))
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.fewshot = fewshot
        self.difficulty = {k: dict(v) for k, v in (difficulty or {}).items()}

    def has_split(self, split: str) -> bool:
        return self.sizes.get(split, 0) > 0

    def raw_split(self, split: str) -> list[dict[str, str]]:
        rows = []
        for t in self.tasks:
            rows += generate_split(t, split, self.sizes[split], self.seed, **self.difficulty.get(t, {}))
        return rows

    def build_splits(self) -> dict[str, Dataset]:
        splits = {}
        shots_pool = {t: generate_split(t, "train", self.fewshot, self.seed + 7919) for t in self.tasks} \
            if self.fewshot else {}
        for split, n in self.sizes.items():
            if n <= 0:
                continue
            rows = [{"prompt": format_prompt(e["input"], shots_pool.get(e["task"])), "completion": f" {e['target']}",
                     "target": e["target"], "task": e["task"]} for e in self.raw_split(split)]
            random.Random(self.seed).shuffle(rows)
            splits[split] = self._encode(rows)
        return splits


class JsonlData(PromptCompletionData):
    """A user's JSONL files, one object per line with prompt and completion fields (names configurable).

    Any of the splits may be missing except the one a run uses: train + test without val trains and tests, a test
    file alone is what `python -m memfit.cli.evaluate` scores. A split may list several files. `template=suite` wraps
    prompts in the task suite's "Q: ...\nA:" template (and answers as " <answer>"), for items in the suite's format
    scored with a model trained on the suite; `raw` uses them as they are. An object's optional `task` field names
    its task (per-task accuracy); otherwise the file's stem does when a split lists several files.
    """

    TEMPLATES = ("raw", "suite")

    def __init__(self, train_file: str | list[str] | None = None, val_file: str | list[str] | None = None,
                 test_file: str | list[str] | None = None, prompt_field: str = "prompt",
                 completion_field: str = "completion", template: str = "raw", **kw):
        super().__init__(**kw)
        check_choice("data.template", template, self.TEMPLATES)
        self.files = {s: [str(f) for f in ([f] if isinstance(f, str) else f)] if f else []
                      for s, f in (("train", train_file), ("val", val_file), ("test", test_file))}
        self.fields = (prompt_field, completion_field)
        self.template = template
        self._rows: dict[str, list[dict[str, str]]] = {}

    def has_split(self, split: str) -> bool:
        return bool(self.files.get(split))

    def _read(self, split: str, path: str, several: bool) -> list[dict[str, str]]:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data.{split}_file={path!r} does not exist")
        rows = []
        pf, cf = self.fields
        default_task = p.stem if several else "jsonl"
        with p.open() as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
                if pf not in obj or cf not in obj:
                    raise ValueError(f"{p}:{lineno}: needs fields {pf!r} and {cf!r}, has {sorted(obj)} "
                                     "(data.prompt_field / data.completion_field name them)")
                prompt, completion = str(obj[pf]), str(obj[cf])
                if self.template == "suite":
                    prompt, completion = format_prompt(prompt), f" {completion.strip()}"
                rows.append({"prompt": prompt, "completion": completion, "task": str(obj.get("task", default_task))})
        if not rows:
            raise ValueError(f"data.{split}_file={path!r} holds no examples")
        return rows

    def rows(self, split: str) -> list[dict[str, str]]:
        """The split's examples as read (prompt, completion, task), before tokenisation."""
        if split not in self._rows:
            several = len(self.files[split]) > 1
            self._rows[split] = [r for f in self.files[split] for r in self._read(split, f, several)]
        return self._rows[split]

    @property
    def tasks(self) -> list[str]:
        """Task names in order of first appearance (the app logs accuracy per task when there are several)."""
        return list(dict.fromkeys(r["task"] for s, f in self.files.items() if f for r in self.rows(s)))

    def build_splits(self) -> dict[str, Dataset]:
        return {s: self._encode(self.rows(s)) for s, f in self.files.items() if f}

    def train_dataloader(self) -> ResumableLoader:
        if not self.files["train"]:
            raise ValueError("data.train_file is not set: training needs it (to only score a model on "
                             "data.test_file, use python -m memfit.cli.evaluate)")
        return super().train_dataloader()


class TextData(LMDataModule):
    """Plain text packed into fixed blocks for (continued) pre-training; loss on every token.

    `files` are local text files; with none given, the text of the generated task suite is used, which is what the
    framework's own pre-training recipe trains on.
    """

    def __init__(self, files: list[str] | None = None, tasks: str | list[str] = "all", n_docs: int = 2000,
                 val_fraction: float = 0.05, list_docs: float = 0.0, **kw):
        super().__init__(**kw)
        self.files = list(files or [])
        self.tasks = resolve_tasks(tasks if isinstance(tasks, str) else list(tasks))
        self.n_docs, self.val_fraction = n_docs, val_fraction
        if not 0.0 <= list_docs < 1.0:
            raise ValueError(f"data.list_docs={list_docs!r} must be a fraction in [0, 1)")
        self.list_docs = list_docs  # share of numbered-list documents (few-shot list continuation, Trans-LoRA)

    def documents(self) -> list[str]:
        if self.files:
            docs = []
            for f in self.files:
                p = Path(f).expanduser()
                if not p.is_file():
                    raise FileNotFoundError(f"text file {str(p)!r} does not exist")
                docs += [d for d in p.read_text().split("\n\n") if d.strip()]
            return docs
        docs = []
        for t in self.tasks:
            docs += [format_prompt(e["input"]) + f" {e['target']}" for e in generate_split(t, "train", self.n_docs,
                                                                                        self.seed)]
        if self.list_docs > 0:
            docs += self.list_documents(round(len(docs) * self.list_docs / (1 - self.list_docs)))
        random.Random(self.seed).shuffle(docs)
        return docs

    def list_documents(self, n: int, items: int = 10) -> list[str]:
        """`n` documents "Here are 10 examples:\n1. <input>\n...\n10. <input>", each listing inputs of one task."""
        rng = random.Random(f"list_docs/{self.seed}")
        pools = {t: [e["input"] for e in generate_split(t, "train", self.n_docs, self.seed)] for t in self.tasks}
        docs = []
        for i in range(n):
            xs = rng.sample(pools[self.tasks[i % len(self.tasks)]], items)
            docs.append(f"Here are {items} examples:\n" + "\n".join(f"{j}. {x}" for j, x in enumerate(xs, 1)))
        return docs

    def has_split(self, split: str) -> bool:
        return split in ("train", "val")

    def build_splits(self) -> dict[str, Dataset]:
        ids: list[int] = []
        for d in self.documents():
            ids += self.tokenizer.encode(d, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        n = self.max_length
        blocks = [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]
        if len(blocks) < 2:
            raise ValueError(f"text too short: {len(ids)} tokens make fewer than 2 blocks of data.max_length={n}")
        n_val = max(1, int(len(blocks) * self.val_fraction))
        rows = [{"input_ids": b, "labels": b} for b in blocks]
        return {"train": Dataset.from_list(rows[n_val:]), "val": Dataset.from_list(rows[:n_val])}
