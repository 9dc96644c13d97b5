"""The JSON cache a resumable benchmark keeps its finished work in: refused when it was made
with other settings (what it measured would not be comparable), written atomically."""

from __future__ import annotations

import json
import os
from typing import Any


def load_cache(path: str, settings: dict[str, Any], empty: dict[str, Any], flag: str
               ) -> dict[str, Any]:
    """The cache at `path`, or {"settings": settings, **empty} when there is none; a cache
    whose settings differ exits with one line naming them and `flag` (where to put another)."""
    if not os.path.exists(path):
        return {"settings": settings, **empty}
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    differs = [k for k in settings if stored["settings"].get(k) != settings[k]]
    if differs:
        raise SystemExit(f"error: {path} was made with other settings ({', '.join(differs)} "
                         f"differ); pass another {flag}")
    return stored


def save_cache(path: str, cache: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temp = path + ".tmp"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(cache, f, indent=1)
    os.replace(temp, path)
