"""Point every `[name](../charlm/file.py#L12)` link in the docs at the line that defines `name` now.

Run after moving code: python scripts/update_doc_links.py  (tests/test_docs.py checks the links).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "README.zh-CN.md", ROOT / "docs" / "equations.md"]
LINK = re.compile(r"(\[`?([\w.]+)`?\]\(([^)#]+\.py)#L)(\d+)(\))")


def definition_line(source: Path, name: str) -> int | None:
    short = name.split(".")[-1]
    for i, text in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if re.match(rf"\s*(def|class) {short}\b", text):
            return i
    return None


def main() -> None:
    for doc in DOCS:
        if not doc.exists():
            continue
        text = doc.read_text(encoding="utf-8")

        def fix(m: re.Match) -> str:
            line = definition_line((doc.parent / m.group(3)).resolve(), m.group(2))
            return f"{m.group(1)}{line or m.group(4)}{m.group(5)}"

        new = LINK.sub(fix, text)
        if new != text:
            doc.write_text(new, encoding="utf-8")
            print(f"updated {doc.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
