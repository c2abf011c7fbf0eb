"""The README documents what the code does: its option tables are the ones the configs give,
and it lists every setting of the service and every metric it exports."""

import dataclasses
from pathlib import Path

from docs.options_tables import README, main, render
from service.http.settings import ServiceSettings


def test_option_tables_equal_the_configs():
    text = README.read_text()
    assert render(text) == text, "README.md's option tables are stale: run 'make docs'"
    assert main(["--check"]) == 0


def test_a_changed_default_makes_the_check_fail():
    text = README.read_text()
    stale = text.replace("| `--epochs` | `20` |", "| `--epochs` | `15` |")
    assert stale != text and render(stale) == text


def test_every_service_setting_is_documented():
    text = Path(README).read_text()
    for field in dataclasses.fields(ServiceSettings):
        assert f"| `{field.name.upper()}` |" in text, field.name.upper()


def test_the_monitoring_table_lists_every_metric_the_service_exports():
    import re

    from service.http.metrics import get_metrics

    text = Path(README).read_text()
    section = text[text.index("## Monitoring") : text.index("## Deploy on Kubernetes")]
    listed = set(re.findall(r"^\| `(classifier_[a-z_]+)` \|", section, flags=re.MULTILINE))
    exported = set()
    for metric in vars(get_metrics()).values():
        (family,) = metric.describe()
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert listed == exported
