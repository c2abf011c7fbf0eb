"""The README's option tables, generated from the configs they describe, so they cannot drift.

python -m docs.options_tables          # rewrite the tables in README.md (make docs)
python -m docs.options_tables --check  # exit 1 if README.md differs (a test runs this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from service.cli.classify import PredictConfig
from service.core.options import options_table
from training.config import AuditConfig, TrainConfig

README = Path(__file__).resolve().parent.parent / "README.md"
# Each generated table sits between a pair of markers in README.md.
TABLES = {"training": TrainConfig, "predict": PredictConfig, "audit": AuditConfig}


def _block(name: str) -> re.Pattern:
    return re.compile(
        rf"(<!-- options:{name} .*?-->\n)(.*?)(<!-- /options:{name} -->)", flags=re.DOTALL
    )


def render(text: str) -> str:
    """``text`` (README.md) with every marked table replaced by the one its config gives."""
    for name, config_class in TABLES.items():
        pattern = _block(name)
        if not pattern.search(text):
            raise ValueError(f"README.md has no <!-- options:{name} ... --> markers")
        table = options_table(config_class)
        text = pattern.sub(lambda match, t=table: f"{match.group(1)}{t}\n{match.group(3)}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    current = README.read_text()
    generated = render(current)
    if "--check" in argv:
        if generated != current:
            print("README.md's option tables differ from the configs: run 'make docs'")
            return 1
        return 0
    README.write_text(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
