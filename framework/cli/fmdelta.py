"""FM-Delta command line: lossless delta compression of fine-tuned HF safetensors checkpoints against their base.

    python -m memfit.cli.fmdelta compress   --base DIR --finetuned DIR --out FILE [--no-context]
    python -m memfit.cli.fmdelta decompress --base DIR --delta FILE --out DIR
    python -m memfit.cli.fmdelta verify     --base DIR --delta FILE [--finetuned DIR]
    python -m memfit.cli.fmdelta stats      --delta FILE [--all]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from memfit.cli.errors import run_cli
from memfit.compression.fmdelta_dir import compress_dir, decompress_dir, stats, verify_dir


def _stats_table(rows: list[dict], show_all: bool) -> str:
    lines = [f"{'tensor':60s} {'dtype':9s} {'mode':7s} {'raw':>12s} {'stored':>12s} {'ratio':>7s}"]
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        per[r["dtype"]][0] += r["raw"]
        per[r["dtype"]][1] += r["stored"]
        if show_all or r["mode"] in ("delta", "raw"):
            ratio = r["stored"] / r["raw"] if r["raw"] else 1.0
            name = "".join(c if c.isprintable() else "?" for c in r["name"][:60])  # names come from the file
            lines.append(f"{name:60s} {r['dtype']:9s} {r['mode']:7s} {r['raw']:12d} {r['stored']:12d} "
                         f"{ratio:7.4f}")
    lines.append("")
    for dt, (raw, st) in sorted(per.items()):
        lines.append(f"{'total ' + dt:60s} {'':9s} {'':7s} {raw:12d} {st:12d} {st / max(raw, 1):7.4f}")
    raw, st = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    lines.append(f"{'TOTAL':60s} {'':9s} {'':7s} {raw:12d} {st:12d} {st / max(raw, 1):7.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memfit.cli.fmdelta", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compress", help="write a delta of --finetuned against --base")
    c.add_argument("--base", type=Path, required=True)
    c.add_argument("--finetuned", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--no-context", action="store_true", help="plain FM-Delta symbols (no base-exponent shift)")
    d = sub.add_parser("decompress", help="rebuild the fine-tuned directory bit for bit")
    d.add_argument("--base", type=Path, required=True)
    d.add_argument("--delta", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    v = sub.add_parser("verify", help="decode and check every checksum (and compare with --finetuned)")
    v.add_argument("--base", type=Path, required=True)
    v.add_argument("--delta", type=Path, required=True)
    v.add_argument("--finetuned", type=Path)
    s = sub.add_parser("stats", help="compression ratio per tensor and per dtype")
    s.add_argument("--delta", type=Path, required=True)
    s.add_argument("--all", action="store_true", help="also list non-tensor records")
    for p in (c, d, v):
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    return run_cli(lambda: _run(a), "memfit.cli.fmdelta")


def _run(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if a.cmd == "compress":
        r = compress_dir(a.base, a.finetuned, a.out, context=not a.no_context, progress=not a.quiet)
        dt = max(time.perf_counter() - t0, 1e-9)
        ratio = r["stored_bytes"] / max(r["raw_bytes"], 1)
        print(f"{a.out}: {r['raw_bytes']} -> {r['stored_bytes']} bytes (ratio {ratio:.4f}) in {dt:.1f} s "
              f"({r['raw_bytes'] / dt / 1e6:.0f} MB/s)")
    elif a.cmd == "decompress":
        decompress_dir(a.base, a.delta, a.out, progress=not a.quiet)
        print(f"wrote {a.out} in {time.perf_counter() - t0:.1f} s")
    elif a.cmd == "verify":
        n = verify_dir(a.base, a.delta, a.finetuned, progress=not a.quiet)
        print(f"OK: {n} files decode with matching checksums" + (" and equal the originals" if a.finetuned else ""))
    else:
        print(_stats_table(stats(a.delta), a.all))


if __name__ == "__main__":
    sys.exit(main())
