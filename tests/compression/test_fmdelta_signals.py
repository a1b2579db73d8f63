"""Signals during writes (issue 17 defect 4, issue 23 point 8): SIGTERM and SIGINT mid-compress and mid-decompress
leave nothing behind and end with 128 + the signal; the FM-Delta checkpoint writer removes its temporary file on
SIGTERM and then dies of the signal as before, and under a handler of its own (Lightning's SIGTERM notice) it finishes
the checkpoint instead. The writes are slowed down in the child (a sleep per record), the parent sends the signal once
the temporary file or staging folder holds data. On the tree before this fix, SIGTERM left `.d.fmd.partial` or
`.out.partial-*` behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from untrusted import make_pair, snapshot

from memfit.cli.fmdelta import main as fmdelta

CLI_CHILD = r"""
import sys, time
from memfit.compression import fmdelta_dir
from memfit.cli.fmdelta import main

def slow(f):
    def g(*a, **k):
        time.sleep(0.3)
        return f(*a, **k)
    return g

fmdelta_dir.encode_record = slow(fmdelta_dir.encode_record)
fmdelta_dir.decode_record = slow(fmdelta_dir.decode_record)
base, ft, delta, root = sys.argv[1:5]
runs = [["compress", "--base", base, "--finetuned", ft, "--out", root + "/new.fmd"],
        ["decompress", "--base", base, "--delta", delta, "--out", root + "/out"],
        ["decompress", "--base", base, "--delta", delta, "--out", root + "/deep/new"]]
for argv in runs:
    for sig in ("TERM", "INT"):
        sys.stdin.readline()  # the parent has checked the tree: go on
        print("start", argv[0], sig, flush=True)
        print("rc", main([*argv, "--quiet"]), flush=True)
"""


def wait_for(pred: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not pred():
        assert proc.poll() is None, f"child ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.01)


def partial_with_data(root: Path) -> bool:
    """A hidden temporary file, or a staging folder holding a file, of ours under root."""
    for p in root.rglob("*"):
        if ".partial" in p.name and (p.is_file() and p.stat().st_size > 0 or
                                     p.is_dir() and any(q.is_file() for q in p.rglob("*"))):
            return True
    return False


def test_cli_signals_mid_write_leave_nothing(tmp_path: Path) -> None:
    base, ft = make_pair(tmp_path / "in")
    delta = tmp_path / "d.fmd"
    assert fmdelta(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(delta), "--quiet"]) == 0
    root = tmp_path / "sandbox"
    (root / "out").mkdir(parents=True)
    (root / "out" / "config.json").write_text("previous output")
    before = snapshot(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", CLI_CHILD, str(base), str(ft), str(delta), str(root)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for _ in range(6):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            _, cmd, sig = proc.stdout.readline().split()
            wait_for(lambda: partial_with_data(root), proc, f"partial output of {cmd}")
            proc.send_signal(getattr(signal, f"SIG{sig}"))
            assert proc.stdout.readline().split() == ["rc", str(128 + getattr(signal, f"SIG{sig}"))], cmd
            assert snapshot(tmp_path) == before, f"{cmd} {sig} left something behind"
        assert proc.wait(timeout=60) == 0
        err = [ln for ln in proc.stderr.read().splitlines() if ln.strip()]
        assert len(err) == 6 and all("interrupted" in ln and "partial output removed" in ln for ln in err), err
        assert sum("SIGTERM" in ln for ln in err) == 3
    finally:
        proc.kill()
        proc.wait()


CALLBACK_CHILD = r"""
import signal, sys, time, torch
from memfit.callbacks.fmdelta import FMDeltaCheckpoint, FMDeltaCheckpointIO, load_fmdelta_checkpoint
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

real_save = torch.save
def slow_save(obj, f, *a, **k):
    f.write(b"x" * 1000)
    f.flush()
    time.sleep(1)
    f.seek(0)
    f.truncate()
    real_save(obj, f, *a, **k)
torch.save = slow_save

base = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
cb = FMDeltaCheckpoint()
cb.base, cb.base_fp = base, __import__("memfit.compression.fmdelta_records", fromlist=["x"]).state_fingerprint(base)
io = FMDeltaCheckpointIO(TorchCheckpointIO(), cb)
ckpt = {"state_dict": {"w": base["w"] + 1e-3}, "epoch": 0}
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # a handler of our own, as Lightning installs in fit
print("start handled", flush=True)
io.save_checkpoint(ckpt, sys.argv[1] + "/handled.ckpt")
back = load_fmdelta_checkpoint(sys.argv[1] + "/handled.ckpt", base)
print("saved", got == [signal.SIGTERM] and torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"]), flush=True)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
sys.stdin.readline()  # the parent has checked the folder: go on
print("start default", flush=True)
io.save_checkpoint(ckpt, sys.argv[1] + "/killed.ckpt")
print("not reached", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_checkpoint_write_on_sigterm(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", CALLBACK_CHILD, str(ckpts)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout.readline().strip() == "start handled"
        wait_for(lambda: partial_with_data(ckpts), proc, "the temporary checkpoint")
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "saved True"  # finished despite the signal, and loads back
        assert sorted(p.name for p in ckpts.iterdir()) == ["handled.ckpt"]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "start default"
        wait_for(lambda: partial_with_data(ckpts), proc, "the second temporary checkpoint")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM  # died of the signal, as without the callback
        assert sorted(p.name for p in ckpts.iterdir()) == ["handled.ckpt"]  # and left no partial file
    finally:
        proc.kill()
        proc.wait()



# One child imports torch/Lightning once (the slow part) and forks a writer per case; the parent signals the writer.
OVERWRITE_CHILD = r"""
import os, signal, sys, time, torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from memfit.callbacks.fmdelta import AtomicCheckpointIO, FMDeltaCheckpoint, FMDeltaCheckpointIO
from memfit.compression.fmdelta_records import state_fingerprint

base = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)}
real_save = torch.save

def slow_save(obj, f, *a, **k):  # the real bytes first, then a stall before the file would be flushed and renamed
    real_save(obj, f, *a, **k)
    f.flush()
    time.sleep(60)

for line in sys.stdin:
    writer, path = line.split()
    if writer == "fmdelta":
        cb = FMDeltaCheckpoint()
        cb.base, cb.base_fp = base, state_fingerprint(base)
        io = FMDeltaCheckpointIO(TorchCheckpointIO(), cb)
    else:
        io = AtomicCheckpointIO()
    torch.save = real_save
    io.save_checkpoint({"state_dict": {"w": base["w"] + 1}, "epoch": 0}, path)  # the previous, complete checkpoint
    pid = os.fork()
    if pid == 0:  # the writer: overwrites the checkpoint, slowly
        torch.save = slow_save
        try:
            io.save_checkpoint({"state_dict": {"w": base["w"] + 2}, "epoch": 1}, path)
        except KeyboardInterrupt:  # unwound through the writer: die of SIGINT as Python would, minus its teardown
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(0)
    print("writer", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("status", os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_signal_while_overwriting_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    """A checkpoint written over an existing one (Lightning's `last.ckpt`), by the plain atomic writer and by the
    FM-Delta one, is killed by SIGTERM or SIGINT (default dispositions) once the whole new checkpoint is in the
    temporary file: the writer dies of the signal (SIGINT: re-raised once the KeyboardInterrupt has unwound the write),
    the folder holds only the previous file, byte for byte as before, and it loads to the previous weights (bf16,
    compared as int16 bits; the FM-Delta one decoded against the base, which fails on any other base)."""
    proc = subprocess.Popen([sys.executable, "-c", OVERWRITE_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    import torch  # while the child starts

    from memfit.callbacks.fmdelta import load_fmdelta_checkpoint

    base = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)}
    try:
        for writer in ("plain", "fmdelta"):
            for sig in (signal.SIGTERM, signal.SIGINT):
                ckpts = tmp_path / f"{writer}-{sig.name}"
                ckpts.mkdir()
                path = ckpts / "last.ckpt"
                proc.stdin.write(f"{writer} {path}\n")
                proc.stdin.flush()
                line = proc.stdout.readline().split()
                assert line[:1] == ["writer"], proc.stderr.read()[-3000:] if proc.poll() is not None else line
                before = path.read_bytes()
                # the temporary file holds the whole new checkpoint (as large as the first): it would look complete
                size = 0.9 * len(before)
                wait_for(lambda ckpts=ckpts, size=size: any(".partial" in p.name and p.stat().st_size >= size
                                                            for p in ckpts.iterdir()),
                         proc, "the new checkpoint in the temporary file")
                os.kill(int(line[1]), sig)
                assert proc.stdout.readline().split() == ["status", str(-sig)], (writer, sig.name)
                assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"], (writer, sig.name)
                assert path.read_bytes() == before, (writer, sig.name)
                if writer == "fmdelta":
                    back = load_fmdelta_checkpoint(path, base)
                else:
                    back = torch.load(path, map_location="cpu", weights_only=True)
                assert back["epoch"] == 0 and back["state_dict"]["w"].dtype == torch.bfloat16
                assert torch.equal(back["state_dict"]["w"].view(torch.int16), (base["w"] + 1).view(torch.int16))
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    finally:
        proc.kill()
        proc.wait()
