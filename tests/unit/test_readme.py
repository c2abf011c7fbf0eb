"""The README documents what the code does: its option tables are the ones the configs give,
and it lists every setting of the service."""

import dataclasses
from pathlib import Path

from docs.options_tables import README, main, render
from service.settings import ServiceSettings


def test_option_tables_equal_the_configs():
    text = README.read_text()
    assert render(text) == text, "README.md's option tables are stale: run 'make docs'"
    assert main(["--check"]) == 0


def test_a_changed_default_makes_the_check_fail():
    text = README.read_text()
    stale = text.replace("| `--epochs` | `30` |", "| `--epochs` | `15` |")
    assert stale != text and render(stale) == text


def test_every_service_setting_is_documented():
    text = Path(README).read_text()
    for field in dataclasses.fields(ServiceSettings):
        assert f"| `{field.name.upper()}` |" in text, field.name.upper()
