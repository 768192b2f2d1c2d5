"""Indexing image tables (tables.py): seconds and peak memory of load_image_directory on generated tables.

    python benchmarks/benchmark_tables.py            # 1M rows each: CSV, Parquet, MLTable (azureml:// URIs)
    python benchmarks/benchmark_tables.py --rows 100000

Each table is indexed in a fresh subprocess, so the peak RSS is the reader's own (the interpreter and
imports are subtracted). Only the index is built: images are not opened (training opens them later).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# VmHWM, not ru_maxrss: after fork + exec, ru_maxrss starts at the parent's peak (which built the tables).
MEASURE = """
import sys, time
from train_pytorch_model.image_directory import load_image_directory
def peak_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
base = peak_mb()
start = time.perf_counter()
directory = load_image_directory(sys.argv[1], "Training")
print(len(directory), time.perf_counter() - start, peak_mb() - base)
"""
URI = "azureml://subscriptions/s/resourcegroups/r/workspaces/w/datastores/d/paths/x/data/{}"


def generate(root: Path, rows: int) -> dict[str, Path]:
    paths = [f"images/c{i % 100}/{i:08d}.jpg" for i in range(rows)]
    labels = [f"c{i % 100}" for i in range(rows)]
    (root / "csv").mkdir()
    with open(root / "csv" / "labels.csv", "w") as handle:
        handle.write("image_path,label\n")
        handle.writelines(f"{p},{c}\n" for p, c in zip(paths, labels))
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"path": paths, "label": labels}), root / "parquet" / "labels.parquet",
                   row_group_size=65536)
    mltable = root / "mltable"
    (mltable / "data" / "images" / "c0").mkdir(parents=True)
    (mltable / "data" / paths[0]).touch()  # the first URI row locates the mount point
    (mltable / "MLTable").write_text("paths:\n  - file: ./rows.jsonl\ntransformations:\n"
                                     "  - read_json_lines: {encoding: utf8}\n")
    with open(mltable / "rows.jsonl", "w") as handle:
        handle.writelines(json.dumps({"image_url": URI.format(p), "label": c}) + "\n" for p, c in zip(paths, labels))
    return {"csv": root / "csv", "parquet": root / "parquet", "mltable": mltable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in generate(Path(tmp), args.rows).items():
            out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True,
                                 env=env, check=True).stdout.split()
            rows, seconds, megabytes = int(out[0]), float(out[1]), float(out[2])
            print(f"{kind:8s} {rows:>9,d} rows  {seconds:6.1f} s  {rows / seconds:>9,.0f} rows/s  "
                  f"+{megabytes:.0f} MB peak RSS")


if __name__ == "__main__":
    main()
