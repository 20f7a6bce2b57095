"""The command blocks of the README and docs/install.md, read from the documents so that the tests run them
exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

from tests.kube.controlplane import ROOT

README = ROOT / "README.md"
INSTALL = ROOT / "docs" / "install.md"


def blocks(document: Path, heading: str) -> list[list[str]]:
    """The ```bash blocks under `heading` (up to the next heading of its level or higher): their
    command lines, comments dropped, continued lines joined."""
    text = document.read_text()
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    end = re.compile(rf"\n#{{1,{len(level)}}} ").search(text, start + len(heading) + 2)
    section = text[start:end.start() if end else len(text)]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = block.replace("\\\n", " ")
        out.append([line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")])
    assert out, f"no bash block under {heading!r} in {document.name}"
    return out
