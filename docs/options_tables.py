"""The docs' generated tables: the option tables from the configs they describe, and the training
job's exit statuses from ``training.cli.ExitCode``, so they cannot drift.

python -m docs.options_tables          # rewrite the tables in their pages (make docs)
python -m docs.options_tables --check  # exit 1 if a page differs (a test runs this)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from service.cli.config import PredictConfig
from service.core.options import options_table
from training.cli import ExitCode
from training.command_config import AuditConfig
from training.config import TrainConfig

DOCS = Path(__file__).resolve().parent


def exit_codes_table() -> str:
    rows = ["| status | name | meaning |", "| --- | --- | --- |"]
    rows += [f"| {int(code)} | `{code.name}` | {code.meaning} |" for code in ExitCode]
    return "\n".join(rows)


# Each generated table: its marker name, the page it sits in, and what renders it. The table sits
# between ``<!-- NAME ... -->`` and ``<!-- /NAME -->`` on that page.
TABLES: dict[str, tuple[Path, Callable[[], str]]] = {
    "options:training": (DOCS / "training.md", lambda: options_table(TrainConfig)),
    "options:audit": (DOCS / "training.md", lambda: options_table(AuditConfig)),
    "exit-codes": (DOCS / "training.md", exit_codes_table),
    "options:predict": (DOCS / "batch.md", lambda: options_table(PredictConfig)),
}
PAGES = sorted({page for page, _ in TABLES.values()})


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {name} .*?-->\n)(.*?)(<!-- /{name} -->)", flags=re.DOTALL)


def render(text: str, page: Path) -> str:
    """``text`` (the page ``page``) with every table marked in it replaced by the generated one."""
    for name, (home, table_of) in TABLES.items():
        if home != page:
            continue
        pattern = _block(name)
        if not pattern.search(text):
            raise ValueError(f"{page.name} has no <!-- {name} ... --> markers")
        table = table_of()
        text = pattern.sub(lambda match, t=table: f"{match.group(1)}{t}\n{match.group(3)}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = []
    for page in PAGES:
        current = page.read_text()
        generated = render(current, page)
        if generated != current:
            stale.append(page)
            if "--check" not in argv:
                page.write_text(generated)
    if stale and "--check" in argv:
        names = ", ".join(f"docs/{page.name}" for page in stale)
        print(f"{names}: the generated tables differ from the code: run 'make docs'")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
