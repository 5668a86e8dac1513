"""Write the settings table that ``backend.settings`` generates into ``docs/configuration.md``.

    python -m tools.settings_doc           # rewrite the table between the markers
    python -m tools.settings_doc --check   # exit 1 if the page's table is out of date

The table itself is ``backend.settings.markdown_table()`` (also printed by ``python -m
backend.settings``); this only replaces what stands between ``<!-- settings-table -->`` and
``<!-- /settings-table -->`` so the page's prose stays as written.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from backend.settings import markdown_table

__all__ = ["CONFIGURATION_DOC", "main", "render"]

CONFIGURATION_DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
_BLOCK = re.compile(r"(<!-- settings-table -->\n)(?:.*?\n)?(<!-- /settings-table -->)", re.S)


def render(page: str) -> str:
    """``page`` with the generated table between its markers (ValueError if it has none)."""
    new, count = _BLOCK.subn(lambda m: m.group(1) + markdown_table() + "\n" + m.group(2), page)
    if count != 1:
        raise ValueError("expected one <!-- settings-table --> ... <!-- /settings-table --> block")
    return new


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only report whether the table is current")
    ap.add_argument("--path", type=Path, default=CONFIGURATION_DOC)
    args = ap.parse_args(argv)
    page = args.path.read_text()
    new = render(page)
    if args.check:
        print("up to date" if new == page else f"out of date: python -m tools.settings_doc ({args.path})")
        return 0 if new == page else 1
    args.path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
