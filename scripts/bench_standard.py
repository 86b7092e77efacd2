"""`make bench`: the standard benchmark set, as markdown, on stdout and in a file.

Character level: vocabulary 65, embedding 64, hidden 256 and 512, 1 and 2
layers, batch 32, window 64. Word level: vocabulary 30,000, embedding and
hidden 256, 2 layers, batch 32, window 35. Then the two end-to-end figures:
generating 10,000 characters (1-layer LSTM 512, batch 1) and scoring 10,000
lines batched against one at a time. Each configuration is one
`charlm bench --markdown` run; this script only lists them and adds a header
describing the machine.

    python scripts/bench_standard.py [--seconds 6] [--rounds 6] [--threads 0] [--device cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CHAR = [f"--vocab-size 65 --embedding-size 64 --hidden-size {h} --layers {n} --batch-size 32 --seq-len 64"
        for h in (256, 512) for n in (1, 2)]
WORD = "--vocab-size 30000 --embedding-size 256 --hidden-size 256 --layers 2 --batch-size 32 --seq-len 35"
EXTRAS = ("--cells lstm --vocab-size 65 --embedding-size 64 --hidden-size 512 --layers 1 --no-grid "
          "--generate 10000 --score-lines 10000 --rounds 3")


def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per model and measurement")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/standard.md"), help="markdown file to write")
    args = parser.parse_args()

    import torch  # only for the header

    common = f"--seconds {args.seconds} --rounds {args.rounds} --threads {args.threads} --device {args.device}"
    runs = [("Character level", c, common) for c in CHAR]
    # a word-level step takes about a second on a CPU: give its rounds more time
    runs.append(("Word level", WORD, f"--seconds {args.seconds * 2} --rounds {args.rounds} "
                                     f"--threads {args.threads} --device {args.device}"))
    runs.append(("Generation and scoring", EXTRAS, f"--threads {args.threads} --device {args.device}"))

    out = [f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
           f"Python {platform.python_version()}; load average at the start {load()}.", ""]
    print("\n".join(out), flush=True)
    for title, config, timing in runs:
        command = f"charlm bench {config} {timing} --markdown"
        print(f"{title}: `{command}`", file=sys.stderr, flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "charlm", "bench", *config.split(), *timing.split(),
                               "--markdown", "--quiet"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            sys.exit(done.returncode)
        block = [f"### {title}", "", f"`{command}` ({time.perf_counter() - start:.0f} s, load average "
                 f"after {load()})", "", done.stdout.rstrip(), ""]
        print("\n".join(block), flush=True)
        out += block
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
