"""Untrusted FM-Delta files (issue 17, defect 1): a bounded, seeded fuzz of mutated, truncated and crafted deltas
(crafted ones carry valid checksums, so they reach every decoder path), crafted record names and wrong bases.

Every case must fail cleanly, with a ValueError carrying a message (ContainerError, BaseMismatchError and
UnsafeNameError are ValueErrors); the output folder must be as it was and nothing may be written anywhere else: the
whole sandbox tree (output folder, a victim file beside it, the targets of absolute names) is snapshotted before and
after each case, every file's bytes hashed. Counts are printed at the end (run with -s).
On the tree before this fix, `../victim.txt` and absolute names were written outside the output folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from untrusted import Record, craft, make_pair, read_records, snapshot, write_records

from memfit.compression.fmdelta_dir import compress_dir, decompress_dir, verify_dir
from memfit.compression.fmdelta_state import load_state_delta, save_state_delta
from memfit.compression.safe_io import safe_relpath

SEED = 17
STATS: Counter = Counter()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    base, ft = make_pair(root)
    delta = root / "d.fmd"
    compress_dir(base, ft, delta, progress=False)
    before = snapshot(root)
    yield base, ft, delta
    assert snapshot(root) == before  # the inputs were never written to
    print(f"\nFM-Delta fuzz: {STATS['cases']} cases, {STATS['refused']} clean refusals, {STATS['identical']} "
          f"decoded to the original bit for bit (unused bits changed), {STATS['outside']} entries changed outside "
          "the output or left behind")


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """tmp_path with out/ (a file that must survive) and a victim file beside it."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous output")
    (tmp_path / "victim.txt").write_text("must not change")
    return tmp_path


def refused(base: Path, delta: Path, root: Path, out: Path, ft: Path | None = None) -> str:
    """Decompress `delta` into `out` under `root`: it must raise a ValueError with a message and leave every entry
    under `root` as it was. Returns the message. With `ft`, a delta that still decodes is accepted only when it
    rebuilds `ft` bit for bit (a changed bit the format does not use: padding, a reserved field); that output is
    then removed again and counted apart."""
    before = snapshot(root)
    STATS["cases"] += 1
    try:
        decompress_dir(base, delta, out, progress=False)
    except ValueError as e:
        msg = str(e)
    else:
        assert ft is not None, f"{delta.name} was accepted"
        got = {k: v for k, v in snapshot(out).items() if k != "keep.txt"}
        assert got == snapshot(ft), f"{delta.name} decoded to other bytes than the original"
        STATS["identical"] += 1
        for k in sorted(got, reverse=True):  # back to the snapshot
            (out / k).rmdir() if (out / k).is_dir() else (out / k).unlink()
        for d in (out, out.parent, out.parent.parent):
            if not (d / "keep.txt").exists() and d != root and d.exists() and not os.listdir(d):
                d.rmdir()
        msg = ""
    after = snapshot(root)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    STATS["outside"] += len(changed)
    assert not changed, f"{delta.name}: {sorted(changed)[:5]}"
    if msg or ft is None:
        assert msg and "\n" not in msg
        STATS["refused"] += 1
    return msg


def outs(root: Path, i: int) -> Path:
    """Alternate between an existing output folder and new ones (nested: their parents must not stay behind)."""
    return [root / "out", root / "new", root / "deep" / "er" / "new"][i % 3]


def test_mutated_and_truncated_deltas(world, sandbox) -> None:
    base, _, delta = world
    blob = delta.read_bytes()
    rng = random.Random(SEED)
    cases: list[bytes] = [blob[:n] for n in (0, 7, 8, 12, 40, len(blob) - 1, len(blob) - 16)]
    cases += [blob[:rng.randrange(len(blob))] for _ in range(60)]
    for _ in range(200):
        b = bytearray(blob)
        pos = rng.randrange(len(b))
        op = rng.randrange(5)
        if op == 0:
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[pos] = rng.randrange(256)
        elif op == 2:
            b.insert(pos, rng.randrange(256))
        elif op == 3:
            del b[pos]
        else:
            n = rng.randrange(1, 64)
            b[pos:pos + n] = bytes(n) if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(n))
        if bytes(b) != blob:
            cases.append(bytes(b))
    for i, data in enumerate(cases):
        bad = sandbox / "bad.fmd"
        bad.write_bytes(data)
        refused(base, bad, sandbox, outs(sandbox, i))


BAD_NAMES = [
    "../victim.txt", "../../victim.txt", "a/../../victim.txt", "tok/../../victim.txt", "/etc/memfit-fuzz", "", ".",
    "..", "./config.json", "a//b", "a/", "x\0y", "x\ny", "\x1b[31mred", "..\\victim.txt", "C:/victim.txt",
    "C:victim.txt", "file.txt:stream", "CON", "nul.txt", "Aux.json", "com1", "LPT9.bin", "x.", "x ", "a" * 256,
    "a/" * 600 + "x", "\udc80.txt",
]


@pytest.mark.parametrize("kind", ["file", "st_file"])
def test_crafted_record_names_are_refused(world, sandbox, kind: str) -> None:
    base, _, delta = world
    absolute = str(sandbox / "abs-target.txt")  # inside the sandbox: a write there would show in the snapshot
    for i, name in enumerate([*BAD_NAMES, absolute]):
        def rename(recs: list[Record], name: str = name) -> list[Record]:
            i = next(j for j, (m, _) in enumerate(recs) if m["kind"] == kind)
            recs[i][0]["name"] = name
            return recs

        msg = refused(base, craft(delta, sandbox / "crafted.fmd", rename), sandbox, outs(sandbox, i))
        assert "unsafe file name" in msg or "not a string" in msg, msg
        assert repr(name[:20])[1:-1] in msg or not name  # the message names the record


GOOD_NAMES = ["模型/ü.json", "..\u2215x", "emoji😀.txt", "ｃｏｎｆｉｇ.json", "a.b.c", ".hidden"]


def test_unicode_names_round_trip_inside_the_output(world, sandbox) -> None:
    base, ft, delta = world
    for name in GOOD_NAMES:
        def rename(recs: list[Record], name: str = name) -> list[Record]:
            i = next(j for j, (m, _) in enumerate(recs) if m.get("name") == "config.json")
            recs[i][0]["name"] = name
            return recs

        out = sandbox / "u"
        decompress_dir(base, craft(delta, sandbox / "crafted.fmd", rename), out, progress=False)
        assert (out / name).read_bytes() == (ft / "config.json").read_bytes()
        assert (out / "model.safetensors").read_bytes() == (ft / "model.safetensors").read_bytes()
        shutil.rmtree(out)
    assert sorted(os.listdir(sandbox)) == ["crafted.fmd", "out", "victim.txt"]


def _dup(recs: list[Record]) -> list[Record]:
    i = next(j for j, (m, _) in enumerate(recs) if m["kind"] == "file")
    return recs + [recs[i]]


def _file_and_folder(recs: list[Record]) -> list[Record]:
    m, p = next(r for r in recs if r[0].get("name") == "config.json")
    return recs + [({**m, "name": "config.json/inner"}, p)]


def _st_header(header: bytes) -> Callable[[list[Record]], list[Record]]:
    def edit(recs: list[Record]) -> list[Record]:
        i = next(j for j, (m, _) in enumerate(recs) if m["kind"] == "st_file")
        recs[i] = (recs[i][0], len(header).to_bytes(8, "little") + header)
        return recs
    return edit


def _tensors(f: Callable[[list[Record]], list[Record]]) -> Callable[[list[Record]], list[Record]]:
    """Apply f to the tensor records only, keeping them after their st_file record."""
    def edit(recs: list[Record]) -> list[Record]:
        i = next(j for j, (m, _) in enumerate(recs) if m["kind"] == "st_file")
        n = recs[i][0]["tensors"]
        return recs[:i + 1] + f(recs[i + 1:i + 1 + n]) + recs[i + 1 + n:]
    return edit


STRUCTURE: dict[str, Callable[[list[Record]], list[Record]]] = {
    "duplicate name": _dup,
    "file and folder of one name": _file_and_folder,
    "tensor outside a safetensors file": lambda r: [x for x in r if x[0]["kind"] != "st_file"],
    "missing tensor": _tensors(lambda t: t[:-1]),
    "extra tensor": _tensors(lambda t: t + t[:1]),
    "swapped tensors": _tensors(lambda t: t[::-1]),
    "unknown kind": lambda r: [({**r[0][0], "kind": "exec"}, r[0][1]), *r[1:]],
    "renamed tensor": _tensors(lambda t: [({**t[0][0], "name": "other"}, t[0][1]), *t[1:]]),
    "header not JSON": _st_header(b"{not json"),
    "header a list": _st_header(b"[1, 2]"),
    "header nested 100k deep": _st_header(b"[" * 100_000 + b"]" * 100_000),
    "header bad offsets": _st_header(json.dumps({"w32": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})
                                     .encode()),
    "no records": lambda r: [],
}


@pytest.mark.parametrize("case", sorted(STRUCTURE))
def test_crafted_structure_is_refused(world, sandbox, case: str) -> None:
    base, _, delta = world
    refused(base, craft(delta, sandbox / "crafted.fmd", STRUCTURE[case]), sandbox, outs(sandbox, len(case)))


def test_crafted_headers_and_meta_fields(world, sandbox) -> None:
    """Every field a decoder reads, replaced by values of other types and ranges (checksums recomputed)."""
    base, _, delta = world
    header, footer, recs = read_records(delta)
    for i, h in enumerate([{**header, "kind": "state_dict"}, {**header, "base_structure": "0" * 64}, {}]):
        refused(base, write_records(sandbox / "h.fmd", h, footer, recs), sandbox, outs(sandbox, i))
    rng = random.Random(SEED)
    pool = [None, -1, 0, 1, 3, 2**31, 2**64, 1.5, "x", "", "../x", [], {}, [1, 2], True, False, [[0, 0, 0, 0]],
            [[2**40, 0, 0, 0]], [-1], "float32", "int8", "raw", "delta", "file"]
    used = {"file": ["kind", "name", "crc"], "st_file": ["kind", "name", "size", "tensors"],
            "tensor": ["kind", "name", "dtype", "shape", "crc", "mode", "base_crc", "block", "context", "segments"]}
    done = 0
    while done < 150:
        j = rng.randrange(len(recs))
        meta = recs[j][0]
        field = rng.choice([f for f in used[meta["kind"]] if f in meta])
        value = rng.choice(pool)
        if json.dumps(value) == json.dumps(meta[field]) or (field == "name" and meta["kind"] != "tensor"
                                                            and _valid_name(value)):
            continue  # unchanged, or a file renamed to another valid name (a crafted but harmless delta)
        edited = list(recs)
        edited[j] = ({**meta, field: value}, recs[j][1])
        if rng.random() < 0.2:  # or drop the field
            edited[j] = ({k: v for k, v in meta.items() if k != field}, recs[j][1])
        refused(base, write_records(sandbox / "m.fmd", header, footer, edited), sandbox, outs(sandbox, done))
        done += 1


def _valid_name(v: object) -> bool:
    try:
        safe_relpath(v)
    except ValueError:
        return False
    return True


def test_crafted_payloads_with_valid_record_checksums(world, sandbox) -> None:
    """Payload bytes changed and the record checksum recomputed: the rANS stream, the block table, the raw bits or
    the decoded tensor's checksum must catch it, unless the bit is one the decoder never reads (padding bits of a
    raw-bit word, the rANS header's reserved field) and the output is the original, bit for bit."""
    base, ft, delta = world
    header, footer, recs = read_records(delta)
    rng = random.Random(SEED + 1)
    tensors = [j for j, (m, _) in enumerate(recs) if m["kind"] == "tensor" and len(recs[j][1])]
    for i in range(80):
        j = rng.choice(tensors)
        p = bytearray(recs[j][1])
        pos = rng.randrange(len(p))
        p[pos] ^= 1 << rng.randrange(8)
        edited = list(recs)
        edited[j] = (recs[j][0], bytes(p))
        refused(base, write_records(sandbox / "p.fmd", header, footer, edited), sandbox, outs(sandbox, i), ft)


def test_symlink_in_the_output_is_not_followed(world, sandbox) -> None:
    base, ft, delta = world
    (sandbox / "elsewhere").mkdir()
    (sandbox / "out" / "tok").symlink_to(sandbox / "elsewhere")
    msg = refused(base, delta, sandbox, sandbox / "out")
    assert "symlink" in msg and "tok/tokenizer.json" in msg
    assert os.listdir(sandbox / "elsewhere") == []
    # a symlinked file is replaced by the rebuilt file (the link itself), its target untouched
    (sandbox / "out" / "tok").unlink()
    (sandbox / "out" / "config.json").symlink_to(sandbox / "victim.txt")
    decompress_dir(base, delta, sandbox / "out", progress=False)
    assert not (sandbox / "out" / "config.json").is_symlink()
    assert (sandbox / "out" / "config.json").read_bytes() == (ft / "config.json").read_bytes()
    assert (sandbox / "victim.txt").read_text() == "must not change"
    assert (sandbox / "out" / "keep.txt").read_text() == "previous output"


def test_wrong_bases(world, sandbox, tmp_path_factory) -> None:
    base, ft, delta = world
    root = tmp_path_factory.mktemp("bases")
    other, _ = make_pair(root / "other", seed=1)  # same structure, other weights
    fewer = root / "fewer"
    shutil.copytree(base, fewer)
    from safetensors.torch import load_file, save_file

    t = load_file(base / "model.safetensors")
    save_file({k: v for k, v in t.items() if k != "w16"}, fewer / "model.safetensors")
    retyped = root / "retyped"
    shutil.copytree(base, retyped)
    save_file({**t, "w32": t["w32"].double()}, retyped / "model.safetensors")
    for i, b in enumerate((other, fewer, retyped, ft)):
        msg = refused(b, delta, sandbox, outs(sandbox, i))
        assert "wrong base model" in msg or "different base model" in msg, msg
    for b, err in ((root / "missing", FileNotFoundError), (delta, NotADirectoryError), (root / "empty", OSError)):
        (root / "empty").mkdir(exist_ok=True)
        before = snapshot(sandbox)
        with pytest.raises(err):
            decompress_dir(b, delta, sandbox / "out", progress=False)
        assert snapshot(sandbox) == before
    with pytest.raises(ValueError, match="wrong base model"):
        verify_dir(other, delta, ft, progress=False)


def test_state_delta_fuzz() -> None:
    """The checkpoint callback's format: mutated and truncated state-dict deltas raise ValueError, never another
    exception, and a clean one decodes bit-exactly (NaN payloads, -0.0, subnormals, empty and 0-d tensors)."""
    import io

    g = torch.Generator().manual_seed(SEED)
    base = {"a": torch.randn(64, 32, generator=g), "b": torch.randn(50, generator=g).bfloat16(),
            "e": torch.empty(0, 3), "s": torch.tensor(1.5), "i": torch.arange(7)}
    ft = {k: (v + 1e-3).to(v.dtype) if v.is_floating_point() else v * 2 for k, v in base.items()}
    from untrusted import specials

    ft["b"][:10] = specials(torch.bfloat16)
    buf = io.BytesIO()
    save_state_delta(buf, ft, base)
    blob = buf.getvalue()
    out = load_state_delta(io.BytesIO(blob), base)
    assert all(torch.equal(out[k].reshape(-1).view(torch.uint8), ft[k].reshape(-1).view(torch.uint8)) for k in ft)
    rng = random.Random(SEED)
    for i in range(200):
        b = bytearray(blob)
        if i % 4 == 0:
            b = b[:rng.randrange(len(b))]
        else:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        STATS["cases"] += 1
        with pytest.raises(ValueError, match="."):
            load_state_delta(io.BytesIO(bytes(b)), base)
        STATS["refused"] += 1


@pytest.mark.parametrize("codec", ["zlib", "zstd", "lzma"])
def test_corrupt_callback_checkpoint_entries(codec: str) -> None:
    """A checkpoint of the FM-Delta callback with a flipped byte in its weights or optimizer payload, or a payload of
    the wrong type, fails with a ValueError naming it (never a codec's or the unpickler's own exception)."""
    import io

    from memfit.callbacks.fmdelta import KEY, FMDeltaCheckpoint
    from memfit.compression.fmdelta_records import state_fingerprint

    g = torch.Generator().manual_seed(SEED)
    base = {"w": torch.randn(32, 8, generator=g)}
    cb = FMDeltaCheckpoint(optimizer_codec=codec)
    cb.base, cb.base_fp = base, state_fingerprint(base)
    opt = [{"state": {0: {"exp_avg": torch.randn(8, generator=g)}}, "param_groups": []}]
    good = cb.encode({"state_dict": {"w": base["w"] + 1e-3}, "optimizer_states": opt})
    rng = random.Random(SEED)
    for key, n in (("state_dict", 20), ("optimizer_states", 20)):
        for _ in range(n):
            t = good[KEY][key].clone()
            t[rng.randrange(t.numel())] ^= 1 << rng.randrange(8)
            ckpt = {**good, KEY: {**good[KEY], key: t}}
            STATS["cases"] += 1
            try:
                cb.decode(dict(ckpt))
            except ValueError as e:
                assert str(e)
                STATS["refused"] += 1
                continue
            raise AssertionError(f"corrupt {key} accepted")  # (zlib/lzma/zstd all carry a checksum)
    for bad in ({**good[KEY], "state_dict": "x"}, [1, 2], {**good[KEY], "state_dict": torch.zeros(3)}):
        with pytest.raises(ValueError):
            cb.decode({**good, KEY: bad})
    buf = io.BytesIO()
    torch.save(good, buf)
    back = cb.decode(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(back["state_dict"]["w"], base["w"] + 1e-3)
