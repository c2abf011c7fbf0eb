"""The data audit measured on the built-in set with planted faults, and what acting on it does.

    python -m benchmarks.audit [--part detection|leakage|exclusion|all] [--update-docs]

detection: the built-in set, less the duplicates the audit finds in it (one image of each group
kept, so that every duplicate left is a planted one), written as PNGs with planted faults
(benchmarks/audit_faults.py); the audit runs as ``python -m training audit`` and its report is
scored against the record of what was planted. leakage and exclusion train models: see
benchmarks/audit_training.py. ``--update-docs`` writes each part's table between docs/training.md's
``<!-- audit-benchmark:PART -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.audit_faults import write_planted_folder
from benchmarks.audit_training import exclusion, exclusion_table, leakage, leakage_table
from training.data.duplicates import keep_one_per_group
from training.data.scan import scan_images
from training.data.sources import load_animals

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The page that shows the audit's measured tables, and the contact sheets of the detection run.
PAGE = ROOT / "docs" / "training.md"
FIGURES = {"label_issues.png": "audit_label_issues.png", "duplicates.png": "audit_duplicates.png"}


def deduplicated_animals():
    """The built-in set without the duplicates the audit finds in it: ``(pixels, names)``."""
    images = load_animals()
    scanned = scan_images(images)
    labels = np.unique(images.names, return_inverse=True)[1]
    keep = np.setdiff1d(np.arange(len(images)), keep_one_per_group(scanned.duplicates.near, labels))
    return images.pixels[keep], images.names[keep], len(images) - len(keep)


def precision_recall(found: set, planted: set) -> dict:
    hits = len(found & planted)
    return {"planted": len(planted), "reported": len(found), "found": hits,
            "precision": round(hits / len(found), 3) if found else None,
            "recall": round(hits / len(planted), 3) if planted else None}  # fmt: skip


def _grouped_with(groups: list[list[dict]], pairs: list[tuple[str, str]]) -> set:
    together = {frozenset(m["file"] for m in group) for group in groups}
    return {copy for copy, of in pairs if any(copy in g and of in g for g in together)}


def score(report: dict, record: dict) -> dict:
    """Precision and recall of each finding against the record of what was planted."""
    near = record["near_copies"]
    groups = report["near_duplicates"]["groups"]
    copies = [(c["file"], c["of"]) for c in near] + [
        (c["file"], c["of"]) for c in record["exact_copies"]
    ]
    planted_pairs = {frozenset(pair) for pair in copies}
    group_sets = [frozenset(m["file"] for m in g) for g in groups]
    wrong = set(record["flipped"]) | {c["file"] for c in near if c["cross_label"]}
    suspects = {row["file"] for row in (report["label_issues"] or {"suspects": []})["suspects"]}
    conflicts = [frozenset(m["file"] for m in g) for g in report["label_conflicts"]]
    cross = {c["file"] for c in near if c["cross_label"]}
    exact = [frozenset(m["file"] for m in g) for g in report["exact_duplicates"]]
    outliers = {row["file"] for row in (report["outliers"] or {"images": []})["images"]}
    return {
        "flipped labels (and copies filed under another class)": precision_recall(suspects, wrong),
        "near duplicates (copy grouped with its original)": precision_recall(
            set(group_sets), planted_pairs) | {"recall_by_copy": round(
                len(_grouped_with(groups, [(c["file"], c["of"]) for c in near])) / len(near), 3)},
        "duplicates under different labels": precision_recall(
            {g for g in conflicts}, {g for g in planted_pairs if g & cross}),
        "exact duplicates": precision_recall(
            set(exact), {frozenset((c["file"], c["of"])) for c in record["exact_copies"]}),
        "corrupt files": precision_recall({r["file"] for r in report["unreadable"]},
                                          set(record["corrupt"])),
        "photos among silhouettes (unknown-looking)": precision_recall(outliers,
                                                                      set(record["outliers"])),
    }  # fmt: skip


def run_audit(folder: Path, output: Path) -> float:
    """``python -m training audit`` on ``folder``; returns its wall-clock seconds."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "training", "audit", "--data", str(folder),
                    "--output", str(output)], check=True, cwd=ROOT)  # fmt: skip
    return time.monotonic() - started


def detection(workdir: Path, seed: int) -> dict:
    pixels, names, removed = deduplicated_animals()
    record = write_planted_folder(workdir / "planted", pixels, names, seed=seed)
    seconds = run_audit(workdir / "planted", workdir / "audit")
    report = json.loads((workdir / "audit" / "report.json").read_text())
    planted = ("near_copies", "exact_copies", "outliers", "corrupt")
    return {
        "base_images": len(names),
        "removed_native_duplicates": removed,
        "audited_files": record["files"] + sum(len(record[key]) for key in planted),
        "audit_seconds": round(seconds, 1),
        "stage_seconds": report["seconds"],
        "estimated_errors": report["label_issues"]["estimated_errors"],
        "cpus": os.cpu_count(),
        "findings": score(report, record),
    }


def detection_table(result: dict) -> str:
    rows = ["| finding | planted | reported | found | precision | recall |",
            "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, row in result["findings"].items():
        rows.append(f"| {name} | {row['planted']} | {row['reported']} | {row['found']} | "
                    f"{row['precision']} | {row['recall']} |")  # fmt: skip
    stages = ", ".join(f"{k} {v} s" for k, v in result["stage_seconds"].items())
    rows += ["", f"{result['audited_files']} files audited in {result['audit_seconds']} s of wall "
             f"clock on {result['cpus']} CPU cores ({stages})."]  # fmt: skip
    return "\n".join(rows)


def update_page(part: str, text: str) -> None:
    """Replace the table of ``part`` between its ``<!-- audit-benchmark:PART -->`` markers."""
    readme = PAGE.read_text()
    pattern = re.compile(
        rf"(<!-- audit-benchmark:{part} .*?-->\n)(.*?)(<!-- /audit-benchmark:{part} -->)", re.S
    )
    if not pattern.search(readme):
        raise SystemExit(f"{PAGE.name} has no <!-- audit-benchmark:{part} --> markers")
    PAGE.write_text(pattern.sub(lambda m: f"{m.group(1)}{text}\n{m.group(3)}", readme))


def measure(part: str, workdir: Path, seed: int) -> tuple[dict, dict]:
    results, tables = {}, {}
    if part in ("detection", "all"):
        results["detection"] = detection(workdir, seed)
        tables["detection"] = detection_table(results["detection"])
    if part in ("leakage", "all"):
        results["leakage"] = leakage(workdir, seed, deduplicated_animals())
        tables["leakage"] = leakage_table(results["leakage"])
    if part in ("exclusion", "all"):
        results["exclusion"] = exclusion(workdir, seed)
        tables["exclusion"] = exclusion_table(results["exclusion"])
    return results, tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audit", description=__doc__)
    parser.add_argument("--part", choices=("detection", "leakage", "exclusion", "all"),
                        default="detection")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update-docs", action="store_true")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a "
                        "temporary folder, removed)")  # fmt: skip
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as temporary:
        workdir = args.keep or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        results, tables = measure(args.part, workdir, args.seed)
        if args.update_docs and "detection" in results:
            for name, target in FIGURES.items():
                shutil.copyfile(workdir / "audit" / name, ROOT / "docs" / "images" / target)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"audit-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n\n".join(tables.values()))
    if args.update_docs:
        for part, text in tables.items():
            update_page(part, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
