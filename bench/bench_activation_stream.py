"""How activations reach DuckDB: peak RSS, time and file size of three ways, each in its own process.

N rows × K random float32 (fresh data per batch, as a model produces; repeated rows compress and
hide the problem), batches of ~16 MB, into a table shaped like ``activation_rows`` of a file
attached with 2,048-row row groups:

- ``commits-2048``: one INSERT per batch, the transaction ended every 2,048 rows (the code before
  store/activation_stream.py, with its memory limit of 1.5 row groups + 64 MB);
- ``one-transaction``: one INSERT per batch, one transaction;
- ``streamed``: ``ActivationStream`` — one INSERT fed batch by batch from a queue (this checkout).

    python bench/bench_activation_stream.py [--n 8192] [--k 65536] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, os, resource, sys, time
import duckdb, numpy as np, pyarrow as pa
sys.path.insert(0, {root!r})
from dissect_tui.store.activation_stream import ActivationStream
from dissect_tui.store.activation_stream import STREAM_MEMORY_BYTES

n, k, variant, path = {n}, {k}, {variant!r}, {path!r}
rows = max(1, (16 << 20) // (4 * k))
limit = (2048 * k * 4 * 3 // 2 + (64 << 20)) if variant == "commits-2048" else STREAM_MEMORY_BYTES
con = duckdb.connect(":memory:")
con.execute(f"SET memory_limit = '{{limit >> 20}}MB'")
con.execute("SET temp_directory = ?", [path + ".tmp"])
if variant != "streamed":
    con.execute("SET preserve_insertion_order = false")  # as the earlier code did
con.execute(f"ATTACH ? AS cache (ROW_GROUP_SIZE 2048)", [path])
con.execute("USE cache")
con.execute("CREATE TABLE activation_rows (layer VARCHAR NOT NULL, image_id INTEGER NOT NULL, acts FLOAT[] NOT NULL)")
con.execute("CHECKPOINT")
t0 = time.perf_counter()
con.execute("BEGIN TRANSACTION")
stream = ActivationStream(con) if variant == "streamed" else None
pending = 0
for i in range(0, n, rows):
    b = min(n, i + rows) - i
    acts = np.random.default_rng(i).standard_normal((b, k), dtype=np.float32)
    ids = np.arange(i, i + b)
    if stream is not None:
        stream.put("wide", ids, acts)
        continue
    off = np.arange(0, (b + 1) * k, k, dtype=np.int32)
    con.register("_in", pa.table({{"image_id": pa.array(ids.astype(np.int32)),
                                  "acts": pa.ListArray.from_arrays(off, pa.array(acts.reshape(-1)))}}))
    con.execute("INSERT INTO activation_rows SELECT 'wide', image_id, acts FROM _in")
    con.unregister("_in")
    pending += b
    if variant == "commits-2048" and pending >= 2048:
        con.execute("COMMIT"); con.execute("BEGIN TRANSACTION"); pending = 0
if stream is not None:
    stream.close()
con.execute("COMMIT")
con.execute("CHECKPOINT")
con.close()
print(json.dumps({{"s": time.perf_counter() - t0, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "file": os.path.getsize(path)}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=65536)
    ap.add_argument("--variants", default="commits-2048,one-transaction,streamed")
    args = ap.parse_args()
    (ROOT / "bench" / "out").mkdir(exist_ok=True)
    print(f"{args.n:,} rows × {args.k:,} float32 ({args.n * args.k * 4 / 1e9:.2f} GB)")
    print(f"{'variant':>16} {'time s':>8} {'peak RSS GB':>12} {'file GB':>8}")
    with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "out") as tmp:
        for variant in args.variants.split(","):
            path = str(Path(tmp) / f"{variant}.duckdb")
            code = textwrap.dedent(CHILD).format(
                root=str(ROOT), n=args.n, k=args.k, variant=variant, path=path
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if out.returncode != 0:
                print(
                    f"{variant:>16}   failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:100]}",
                    flush=True,
                )
            else:
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"{variant:>16} {r['s']:>8.1f} {r['rss'] / 1e9:>12.2f} {r['file'] / 1e9:>8.2f}",
                    flush=True,
                )
            for leftover in Path(tmp).glob(f"{variant}.duckdb*"):
                if leftover.is_file():
                    leftover.unlink()


if __name__ == "__main__":
    main()
