"""Throughput of the diffusion stage's input and training step on a real run directory.

    python tools/bench_diffusion.py --run runs/tiny [--workers 1 2] [--repeats 5]

1. Loader: latent samples/s of ``ShardLoader`` over the encode stage's train shards per worker
   count (decoding included), median of ``--repeats`` epochs: over the whole epoch and after
   its first batch (without the start-up of the epoch's workers).
2. Training: the diffusion stage's own log (``diffusion/metrics.jsonl``, written by the run):
   median images/s, step time and data-wait fraction over the logged windows (the first
   window, which includes start-up, is left out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

from pipeline.data.stream import ShardLoader


def loader_rate(pattern: str, workers: int, batch_size: int, count: int) -> tuple[float, float]:
    """(samples/s over a whole epoch, samples/s after the first batch): the difference is the
    start-up of the epoch's worker processes."""
    loader = ShardLoader(
        pattern, batch_size=batch_size, num_workers=workers, seed=0, samples_per_epoch=count, shuffle_buffer=1000
    )
    start, seen, first = time.perf_counter(), 0, None
    for batch in loader:
        if first is None:
            first, after_first = time.perf_counter(), -len(batch["key"])
        seen += len(batch["key"])
        after_first += len(batch["key"])
    end = time.perf_counter()
    return seen / (end - start), after_first / (end - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="experiment directory, e.g. runs/tiny")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128, help="loader batch size")
    args = parser.parse_args()

    encoded = json.loads((args.run / "encode" / "manifest.json").read_text())
    count = sum(o.get("count", 0) for o in encoded["outputs"] if o.get("split") == "train")
    pattern = str(args.run / "encode" / "latents" / "train-*.tar")
    print(f"latent shards: {pattern} ({count} samples, fields {encoded['latent']['fields']})")
    for workers in args.workers:
        rates = [loader_rate(pattern, workers, args.batch_size, count) for _ in range(args.repeats)]
        epoch, steady = statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)
        print(
            f"  ShardLoader, {workers} worker(s): {epoch:,.0f} samples/s per epoch incl. worker start-up, "
            f"{steady:,.0f} after the first batch ({steady / max(workers, 1):,.0f} per worker)"
        )

    log = args.run / "diffusion" / "metrics.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines()][1:]
        trained = yaml.safe_load((args.run / "diffusion" / "config.yaml").read_text())["diffusion"]
        rate = statistics.median(r["images_per_s"] for r in rows)
        batch = trained["batch_size"]
        print(
            f"diffusion stage ({trained['backbone']}, {len(rows)} logged windows after the first): "
            f"{rate:,.0f} images/s, step {batch / rate * 1000:.0f} ms at batch {batch} per rank, "
            f"data wait {statistics.median(r['data_wait_fraction'] for r in rows):.2%} of step time, "
            f"{statistics.median(r['model_tflops'] for r in rows) * 1000:.0f} model GFLOP/s"
        )


if __name__ == "__main__":
    main()
