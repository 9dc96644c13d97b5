"""docs/benchmarks.md is shared by the benchmark scripts: each one rewrites only its own
`## ` section (found by its heading) and leaves the others as they are."""

from __future__ import annotations

import os


def write_section(path: str, heading: str, text: str, replaces: str | None = None) -> None:
    """Write `text` (starting with `heading`) into `path`, replacing only that section (or,
    where there is none yet, the section headed `replaces`: a script's former heading)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read().splitlines()
    else:
        old = ["# Benchmarks", ""]
    start = next((i for i, line in enumerate(old) if line.strip() == heading), None)
    if start is None and replaces:
        start = next((i for i, line in enumerate(old) if line.strip() == replaces), None)
    if start is None:
        while old and not old[-1].strip():
            old.pop()
        new = [*old, "", *text.rstrip("\n").splitlines()]
    else:
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")),
                   len(old))
        tail = old[end:]
        new = [*old[:start], *text.rstrip("\n").splitlines(), *([""] + tail if tail else [])]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(new) + "\n")
