"""The docs say what the code does: their generated tables are the ones the code gives, they list
every setting of the service and every metric it exports, and every link and every `make`
target they name exists."""

import dataclasses
import re
from pathlib import Path

from docs.options_tables import DOCS, PAGES, main, render
from service.http.settings import ServiceSettings

ROOT = DOCS.parent
# Every page a reader is pointed to.
MARKDOWN = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "BENCHMARKS.md"]
MARKDOWN += sorted(DOCS.glob("*.md"))


def test_generated_tables_equal_the_code():
    for page in PAGES:
        text = page.read_text()
        assert render(text, page) == text, f"{page.name}'s tables are stale: run 'make docs'"
    assert main(["--check"]) == 0


def test_a_changed_default_makes_the_check_fail():
    page = DOCS / "training.md"
    text = page.read_text()
    stale = text.replace("| `--epochs` | `20` |", "| `--epochs` | `15` |")
    assert stale != text and render(stale, page) == text
    stale = text.replace("| 4 | `DATA` |", "| 2 | `DATA` |")
    assert stale != text and render(stale, page) == text


def test_every_service_setting_is_documented():
    text = (DOCS / "serving.md").read_text()
    for field in dataclasses.fields(ServiceSettings):
        assert f"| `{field.name.upper()}` |" in text, field.name.upper()


def test_the_monitoring_table_lists_every_metric_the_service_exports():
    from service.http.metrics import get_metrics

    text = (DOCS / "monitoring.md").read_text()
    listed = set(re.findall(r"^\| `(classifier_[a-z_]+)` \|", text, flags=re.MULTILINE))
    exported = set()
    for metric in vars(get_metrics()).values():
        (family,) = metric.describe()
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert listed == exported


def anchors_of(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to -)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings
    }


def broken_links(pages: list[Path]) -> list[str]:
    found = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                found.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
                found.append(f"{page.name}: {target} (no such heading)")
    return found


def test_every_relative_link_and_anchor_exists():
    assert not broken_links(MARKDOWN), broken_links(MARKDOWN)


def test_a_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[a](missing.md) [b](#title) [c](#nowhere) [d](https://x.org)\n")
    assert broken_links([page]) == [
        "page.md: missing.md (no such file)",
        "page.md: #nowhere (no such heading)",
    ]


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, flags=re.MULTILINE))


def test_every_make_target_the_docs_name_exists():
    targets = make_targets()
    named = set()
    for page in MARKDOWN:
        # `make x` in a code span, or a command line of a code block that starts with it
        text = page.read_text()
        named |= set(re.findall(r"(?:`|^)make ([a-z][a-z0-9-]*)", text, flags=re.MULTILINE))
    assert named - targets == set(), named - targets


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 320
    first_screen = "\n".join(readme.splitlines()[:20])
    assert "ARCHITECTURE.md" in first_screen
