"""README's Troubleshooting quotes the messages as the code writes them: each quoted text must occur
in the package's (or the tests' skip-reason) source, so renaming a message without the README fails."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def quotes() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    found = []
    for item in re.findall(r"^\* (.*?)(?= — )", section, re.M | re.S):
        found += re.findall(r"`([^`]+)`", item)
    return found


def sources() -> str:
    files = [p for p in REPO.rglob("*.py") if not {".venv", ".vendor", "node_modules", ".dev"} & set(p.parts)]
    return "\n".join(p.read_text(encoding="utf-8") for p in files)


def test_every_troubleshooting_quote_is_in_the_code():
    q = quotes()
    assert len(q) >= 20, q
    code = sources()
    missing = [m for m in q if m not in code]
    assert not missing, f"README quotes messages the code no longer writes: {missing}"
