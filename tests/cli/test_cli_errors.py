"""Every CLI maps user errors to one line on stderr and exit code 1, and leaves no partial file (issue 17, defects 2,
3 and 6): compress --out at a directory, wrong-kind and missing paths, a read-only output (as root, where chmod does
not stop writes, the PermissionError is injected), a full disk, corrupt safetensors for `neuzip stats`, a garbage
checkpoint for consolidate, a bad option for transfer. On the tree before this fix, --out at a directory, --delta at
a directory, decompress --out at a file and every corrupt-safetensors case ended in a traceback, and compress left a
`.NAME.fmd.partial` behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from untrusted import make_pair, snapshot

from memfit.cli.fmdelta import main as fmdelta
from memfit.compression import safe_io


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, ft = make_pair(tmp_path / "in")
    delta = tmp_path / "d.fmd"
    assert fmdelta(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(delta), "--quiet"]) == 0
    return base, ft, delta


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert ".partial" not in err  # never a hidden temporary name
    return err


def run_fmd(capsys, tmp_path: Path, argv: list[str], *needles: str) -> str:
    """The CLI exits 1 with one line naming the problem and the tree under tmp_path is unchanged."""
    before = snapshot(tmp_path)
    assert fmdelta([*argv, "--quiet"] if argv[0] != "stats" else argv) == 1
    assert snapshot(tmp_path) == before
    return one_line_error(capsys, *needles)


def test_fmdelta_path_errors(pair, tmp_path: Path, capsys) -> None:
    base, ft, delta = pair
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("x")
    b, f, d = str(base), str(ft), str(delta)
    cases = [
        (["compress", "--base", b, "--finetuned", f, "--out", str(tmp_path / "outdir")], "outdir is a directory"),
        (["compress", "--base", str(tmp_path / "nope"), "--finetuned", f, "--out", str(tmp_path / "x.fmd")],
         "base model folder", "does not exist"),
        (["compress", "--base", b, "--finetuned", str(tmp_path / "afile"), "--out", str(tmp_path / "x.fmd")],
         "is a file, not a folder"),
        (["compress", "--base", b, "--finetuned", f, "--out", str(tmp_path / "no" / "x.fmd")], "does not exist"),
        (["decompress", "--base", b, "--delta", str(tmp_path / "outdir"), "--out", str(tmp_path / "o")],
         "is a folder, not a file"),
        (["decompress", "--base", b, "--delta", str(tmp_path / "nope.fmd"), "--out", str(tmp_path / "o")],
         "does not exist"),
        (["decompress", "--base", b, "--delta", d, "--out", str(tmp_path / "afile")], "not a directory"),
        (["decompress", "--base", str(tmp_path / "afile"), "--delta", d, "--out", str(tmp_path / "o")],
         "is a file, not a folder"),
        (["decompress", "--base", b, "--delta", str(tmp_path / "afile"), "--out", str(tmp_path / "o")],
         "not an FM-Delta file"),
        (["verify", "--base", b, "--delta", d, "--finetuned", str(tmp_path / "nope")], "does not exist"),
        (["stats", "--delta", str(tmp_path / "afile")], "not an FM-Delta file"),
        (["stats", "--delta", str(tmp_path / "outdir")], "is a folder"),
    ]
    for argv, *needles in cases:
        run_fmd(capsys, tmp_path, argv, *needles)


def _denied(parent: Path, prefix: str, suffix: str, make) -> None:
    """What creating the temporary file or folder raises in a read-only folder: a PermissionError naming it."""
    raise PermissionError(errno.EACCES, "Permission denied", str(parent / f"{prefix}abc{suffix}"))


def test_read_only_output_is_named_not_its_temporary(pair, tmp_path: Path, capsys, monkeypatch) -> None:
    base, ft, delta = pair
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # a real read-only folder where permissions apply
        ro.chmod(0o555)
    else:
        monkeypatch.setattr(safe_io, "fresh_entry", _denied)
    try:
        run_fmd(capsys, tmp_path, ["compress", "--base", str(base), "--finetuned", str(ft), "--out",
                                   str(ro / "d.fmd")], "cannot write", str(ro / "d.fmd"), "Permission denied")
        run_fmd(capsys, tmp_path, ["decompress", "--base", str(base), "--delta", str(delta), "--out", str(ro)],
                "cannot write into", str(ro), "Permission denied")
    finally:
        ro.chmod(0o755)


class _FullDisk:
    """A file object that takes `room` bytes, then fails as a full disk does (write raises ENOSPC, no file name)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b) -> int:
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_full_disk_leaves_nothing_and_says_so(pair, tmp_path: Path, capsys, monkeypatch) -> None:
    base, ft, delta = pair
    real_fdopen = os.fdopen
    monkeypatch.setattr(safe_io.os, "fdopen", lambda *a, **k: _FullDisk(real_fdopen(*a, **k), 5000))
    run_fmd(capsys, tmp_path, ["compress", "--base", str(base), "--finetuned", str(ft), "--out",
                               str(tmp_path / "new.fmd")], "disk full", str(tmp_path / "new.fmd"))
    monkeypatch.setattr(safe_io, "open", lambda *a, **k: _FullDisk(open(*a, **k), 5000), raising=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("previous")
    for out in (tmp_path / "out", tmp_path / "fresh"):
        run_fmd(capsys, tmp_path, ["decompress", "--base", str(base), "--delta", str(delta), "--out", str(out)],
                "disk full", str(out))


def _st(tmp_path: Path, name: str, data: bytes) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(data)
    return d


def test_neuzip_stats_on_corrupt_safetensors(tmp_path: Path, capsys) -> None:
    from memfit.cli.neuzip import main as neuzip

    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'
    cases = {
        "empty": (b"", "shorter than 8 bytes"),
        "truncated": (len(header).to_bytes(8, "little") + header + bytes(8), "do not match its shape or the file"),
        "bad_json": ((9).to_bytes(8, "little") + b"{not json" + bytes(16), "corrupt safetensors header"),
        "list": ((6).to_bytes(8, "little") + b"[1, 2]", "not a JSON object"),
        "huge_header": ((2**40).to_bytes(8, "little") + header, "exceeds the file size"),
    }
    for name, (data, needle) in cases.items():
        d = _st(tmp_path, name, data)
        assert neuzip(["stats", str(d), "--quiet"]) == 1
        one_line_error(capsys, needle, str(d / "model.safetensors"))
    assert neuzip(["stats", str(tmp_path / "empty" / "model.safetensors"), "--quiet"]) == 1
    one_line_error(capsys, "is a file, not a folder")


def test_consolidate_errors(tmp_path: Path, capsys) -> None:
    from memfit.cli.consolidate import main as consolidate

    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "bad.yaml").write_text("a: [unclosed")
    assert consolidate([str(tmp_path / "missing.ckpt"), str(tmp_path / "hf"), "--config", str(tmp_path / "bad.yaml")]
                       ) == 1
    one_line_error(capsys, "not valid YAML")
    (tmp_path / "ok.yaml").write_text("model: {}\n")
    assert consolidate([str(tmp_path / "garbage.ckpt"), str(tmp_path / "hf"), "--config", str(tmp_path / "ok.yaml")]
                       ) == 1
    one_line_error(capsys, "not a readable checkpoint", "garbage.ckpt")
    assert consolidate([str(tmp_path / "missing.ckpt"), str(tmp_path / "hf")]) == 1
    one_line_error(capsys, "no .hydra/config.yaml")
    assert not (tmp_path / "hf").exists()


def test_transfer_cli_user_error_is_one_line(tmp_path: Path, capsys) -> None:
    """The Hydra entry point's body (the decorator only composes the config): exit code 1, one line, no traceback."""
    from memfit.cli.transfer import main as transfer
    from memfit.config import compose

    cfg = compose("transfer", ["stages=[bogus]", f"run_dir={tmp_path / 'run'}", f"paths.output_dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        transfer.__wrapped__(cfg)
    assert e.value.code == 1
    one_line_error(capsys, "bogus")


def test_outputs_get_default_permissions(pair, tmp_path: Path) -> None:
    """Written through hidden temporaries, outputs still get the permissions a plain open()/mkdir would give them
    (tempfile's 0600 files and 0700 folders must not leak into the result)."""
    base, ft, delta = pair
    (tmp_path / "ref.txt").write_text("x")
    (tmp_path / "refdir").mkdir()
    assert fmdelta(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(tmp_path / "n.fmd"),
                    "--quiet"]) == 0
    assert fmdelta(["decompress", "--base", str(base), "--delta", str(delta), "--out", str(tmp_path / "o"),
                    "--quiet"]) == 0
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "n.fmd") == mode(tmp_path / "ref.txt") == mode(tmp_path / "o" / "config.json")
    assert mode(tmp_path / "o") == mode(tmp_path / "refdir") == mode(tmp_path / "o" / "tok")
