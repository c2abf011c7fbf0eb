"""``report.md``: the audit's counts, then each finding with its files, for a person to read."""

from __future__ import annotations

SHOWN = 40


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |"
              for row in rows[:SHOWN]]  # fmt: skip
    if len(rows) > SHOWN:
        lines.append(f"\n... and {len(rows) - SHOWN} more in report.json")
    return lines + [""]


def _groups(title: str, groups: list[list[dict]], note: str = "") -> list[str]:
    lines = [f"## {title} ({len(groups)})", ""] + ([note, ""] if note else [])
    rows = [[n + 1, ", ".join(f"`{m['file']}` ({m['label']})" for m in group)]
            for n, group in enumerate(groups)]  # fmt: skip
    return lines + (_table(["group", "files (label)"], rows) if rows else ["None.", ""])


def _files(title: str, rows: list[dict], columns: list[str], note: str = "") -> list[str]:
    lines = [f"## {title} ({len(rows)})", ""] + ([note, ""] if note else [])
    if not rows:
        return lines + ["None.", ""]
    return lines + _table(columns, [[row[column] for column in columns] for row in rows])


def _labels(section: dict | None) -> list[str]:
    if section is None:
        return ["## Suspected label errors", "", "Not checked (--no-label-issues).", ""]
    warning = (
        ""
        if section["reliable"]
        else ("**Unreliable**: the out-of-fold model is too weak to judge labels. ")
    )
    note = (f"{warning}{section['method']}, out-of-fold accuracy "
            f"{section['out_of_fold_accuracy']}. The calibrated confident joint estimates "
            f"{section['estimated_errors']} wrong labels. Ranked by the probability of the given "
            "label, lowest first; relabel.csv lists them all for review.")  # fmt: skip
    return _files("Suspected label errors", section["suspects"],
                  ["file", "given", "suggested", "given_probability", "suggested_probability"],
                  note)  # fmt: skip


def _outliers(section: dict | None) -> list[str]:
    if section is None:
        return []
    note = f"{section['method']} ({section['threshold']})."
    return _files("Unknown-looking images", section["images"], ["file", "label", "score"], note)


def counts(report: dict) -> list[tuple[str, int | str]]:
    """The headline counts, as report.md and the console show them."""
    issues, outliers = report["label_issues"], report["outliers"]
    near = report["near_duplicates"]["groups"]
    return [
        ("images", report["images"]),
        ("classes", len(report["class_counts"])),
        ("unreadable files", len(report["unreadable"])),
        ("files that are not images (ignored)", len(report["not_images"])),
        ("images of odd size or mode", len(report["odd_images"])),
        ("exact duplicate groups", len(report["exact_duplicates"])),
        ("near duplicate groups (exact included)", len(near)),
        ("images in near duplicate groups", sum(len(group) for group in near)),
        ("duplicate groups under different labels", len(report["label_conflicts"])),
        ("suspected label errors", "not checked" if issues is None else len(issues["suspects"])),
        ("unknown-looking images", "not checked" if outliers is None else len(outliers["images"])),
        ("largest class / smallest class", report["imbalance"]["largest_to_smallest"]),
    ]


def markdown(report: dict, sheets: list[str]) -> str:
    lines = [f"# Data audit of {report['source']}", ""]
    lines += _table(["", "count"], [list(pair) for pair in counts(report)])
    lines += [f"![{name}]({name})" for name in sheets] + [""]
    lines += _table(["class", "images"], list(map(list, report["class_counts"].items())))
    lines += _files("Unreadable files", report["unreadable"], ["file", "reason"])
    lines += _files("Images of odd size or mode", report["odd_images"], ["file", "reason"])
    lines += _groups("Duplicates under different labels", report["label_conflicts"])
    lines += _labels(report["label_issues"])
    lines += _groups("Exact duplicates", report["exact_duplicates"],
                     "Identical pixels (sha256 of the decoded image).")  # fmt: skip
    near = report["near_duplicates"]
    lines += _groups("Near duplicates", near["groups"], near["method"] + ".")
    lines += _outliers(report["outliers"])
    for key, title in (
        ("dropped_duplicates", "Dropped duplicates (--drop-duplicates)"),
        ("excluded_suspects", "Left out of training (--exclude-suspected-labels)"),
    ):
        if report[key]:
            lines += _files(title, report[key], ["file", "label"])
    seconds = ", ".join(f"{name} {value} s" for name, value in report["seconds"].items())
    return "\n".join(lines + [f"Time: {seconds}.", ""])
