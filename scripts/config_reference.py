"""Print the config reference of the README: every field, its default, its range, what it does.

The table comes from `charlm.config.describe_fields()`, the same metadata that
validates a config, and tests/test_docs.py checks that README.md holds exactly
this output between its `config-reference` markers. After changing a field in
charlm/config.py, run

    python scripts/config_reference.py --write

to refresh README.md in place (README.zh-CN.md's table is translated by hand;
the test names any row it is missing).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from charlm.config import describe_fields

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def format_default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def cell(text: str) -> str:
    """Escape a table cell: `|` would end the cell, and <unk> would be read as an HTML tag."""
    return re.sub(r"(<\w+>)", r"`\1`", text.replace("|", "\\|"))


def markdown_table() -> str:
    lines = ["| key | default | range | meaning |", "|---|---|---|---|"]
    for key, default, rng, help_text in describe_fields():
        lines.append(f"| `{key}` | `{format_default(default)}` | {cell(rng)} | {cell(help_text)} |")
    return "\n".join(lines)


def replace_between_markers(text: str, table: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"no {BEGIN} ... {END} markers found")
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text, count=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md instead of printing it")
    args = parser.parse_args()
    table = markdown_table()
    if not args.write:
        sys.stdout.write(table + "\n")
        return
    readme = Path(__file__).resolve().parent.parent / "README.md"
    readme.write_text(replace_between_markers(readme.read_text(encoding="utf-8"), table), encoding="utf-8")


if __name__ == "__main__":
    main()
