"""A copy of a run folder whose metrics.jsonl is as long as a long run's, to measure `runs` and `plot` on.

The training and validation lines repeat the shapes of the run's own (the same keys, in the same order),
with steps and times going on at the run's logging interval and a falling, noisy loss; the run's start
and end records open and close the file (the end record's steps and elapsed moved to the last line's).
docs/benchmarks-history.md ("`runs` and `plot` on long logs") has the figures measured with it.

    python scripts/long_metrics_log.py RUN_DIR OUT_DIR [--lines 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from pathlib import Path


def first_lines(metrics: Path) -> dict[str, dict]:
    """The first start, training, validation and end records of a metrics.jsonl, by kind."""
    found: dict[str, dict] = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        kind = record.get("event") or ("train" if "train_loss" in record else "val" if "val_loss" in record else None)
        if kind is not None and kind not in found:
            found[kind] = record
    return found


def write_long_log(shapes: dict[str, dict], out: Path, lines: int, seed: int) -> None:
    train, val = shapes["train"], shapes.get("val")
    interval = train["step"]  # the first line comes after log_interval steps
    timed = shapes.get("end", train)  # the whole run's pace, where it ended: its first steps are the slowest
    seconds_a_step = timed["elapsed"] / timed.get("steps", timed.get("step"))
    checks_every = max(val["step"] // interval, 1) if val else None  # training lines between two checks
    rng = random.Random(seed)
    with open(out, "w", encoding="utf-8") as fh:
        if "start" in shapes:
            fh.write(json.dumps(shapes["start"]) + "\n")
        for i in range(1, lines + 1):
            step = i * interval
            elapsed = round(step * seconds_a_step, 3)
            loss = 1.2 + 2.0 * math.exp(-i / (lines / 20)) + rng.gauss(0, 0.05)
            fh.write(json.dumps(train | {"step": step, "elapsed": elapsed, "train_loss": loss}) + "\n")
            if checks_every and i % checks_every == 0:
                val_loss = 1.25 + 2.0 * math.exp(-i / (lines / 20))
                bpc = val["val_bpc"] / val["val_loss"] * val_loss  # the run's characters per token
                fh.write(json.dumps(val | {"step": step, "elapsed": elapsed, "val_loss": val_loss,
                                           "val_ppl": math.exp(val_loss), "val_bpc": bpc}) + "\n")
        if "end" in shapes:
            fh.write(json.dumps(shapes["end"] | {"steps": lines * interval,
                                                 "elapsed": lines * interval * seconds_a_step}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path, help="a new folder: the run's files, the long metrics.jsonl")
    parser.add_argument("--lines", type=int, default=100_000, help="training lines to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes = first_lines(args.run_dir / "metrics.jsonl")
    if "train" not in shapes:
        parser.error(f"{args.run_dir}/metrics.jsonl holds no training line to copy")
    shutil.copytree(args.run_dir, args.out_dir)
    write_long_log(shapes, args.out_dir / "metrics.jsonl", args.lines, args.seed)


if __name__ == "__main__":
    main()
