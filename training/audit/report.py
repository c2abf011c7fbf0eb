"""The audit report: ``report.json`` for machines, ``report.md`` and contact sheets for a person,
``relabel.csv`` of the suspected label errors to review, and a summary of a few lines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from service.core.preprocessing import decode_image
from training.audit.markdown import counts, markdown
from training.audit.run import FENCE, IMBALANCE_RATIO, AuditResult
from training.audit.sheets import contact_sheet, short
from training.data.duplicates import MIN_CORRELATION, PHASH_DISTANCE
from training.data.sources import LabelledImages

# Rows of each list in report.md (report.json has them all) and tiles per contact sheet.
SHOWN = 40
TILE_SIDE = 64


def _files(result: AuditResult, indices) -> list[dict]:
    keys, names = result.inventory.keys, result.class_names
    return [{"file": keys[i], "label": names[result.labels[i]]} for i in indices]


def label_issue_rows(result: AuditResult) -> list[dict]:
    issues, names = result.issues, result.class_names
    if issues is None:
        return []
    return [
        {
            "file": result.inventory.keys[index],
            "given": names[issues.given[rank]],
            "suggested": names[issues.suggested[rank]],
            "given_probability": round(float(issues.self_confidence[rank]), 4),
            "suggested_probability": round(float(issues.suggested_probability[rank]), 4),
        }
        for rank, index in enumerate(issues.ranked.tolist())
    ]


def _label_section(result: AuditResult) -> dict | None:
    if result.issues is None:
        return None
    return {
        "method": "confident learning (Northcutt et al. 2021) on out-of-fold probabilities: "
        + result.oof.method,
        "out_of_fold_accuracy": round(result.oof_accuracy, 4),
        "reliable": result.labels_judged,
        "estimated_errors": result.issues.estimated_errors,
        "thresholds": dict(
            zip(result.class_names, result.issues.thresholds.round(4).tolist(), strict=True)
        ),
        "suspects": label_issue_rows(result),
    }


def _outlier_section(result: AuditResult) -> dict | None:
    if result.oof is None:
        return None
    scores = result.oof.ood_scores
    return {
        "method": f"unknown-input score (Mahalanobis, out of fold) above Q3 + {FENCE} IQR",
        "threshold": round(float(result.outlier_threshold), 4),
        "images": [
            row | {"score": round(float(scores[i]), 4)}
            for row, i in zip(_files(result, result.outliers), result.outliers, strict=True)
        ],
    }


def to_json(result: AuditResult) -> dict:
    inventory, duplicates = result.inventory, result.duplicates
    return {
        "source": result.source,
        "images": len(inventory),
        "class_counts": result.class_counts(),
        "imbalance": {
            "largest_to_smallest": round(result.imbalance(), 3),
            "flagged": result.imbalance() >= IMBALANCE_RATIO,
        },  # fmt: skip
        "unreadable": inventory.unreadable,
        "not_images": inventory.not_images,
        "odd_images": [{k: v for k, v in row.items() if k != "index"} for row in result.odd],
        "exact_duplicates": [_files(result, group) for group in duplicates.exact],
        "near_duplicates": {
            "method": f"pHash (imagehash, 64 bits) at most {PHASH_DISTANCE} bits apart, confirmed "
            f"by a correlation of 32x32 greyscale thumbnails of at least {MIN_CORRELATION}; "
            "groups include exact copies",
            "groups": [_files(result, group) for group in duplicates.near],
        },
        "label_conflicts": [_files(result, group) for group in result.conflicts],
        "label_issues": _label_section(result),
        "outliers": _outlier_section(result),
        "dropped_duplicates": _files(result, result.dropped),
        "excluded_suspects": _files(result, result.excluded),
        "seconds": result.seconds,
    }


def summary(result: AuditResult, folder: Path | None) -> str:
    """A few lines for the console."""
    report = to_json(result)
    shown = [f"{name} {value}" for name, value in counts(report)[2:]]
    lines = [f"audit of {result.source}: {len(result.inventory)} images, "
             f"{len(result.class_names)} classes"]  # fmt: skip
    lines += ["  " + ", ".join(shown[i : i + 3]) for i in range(0, len(shown), 3)]
    if result.oof is not None and not result.labels_judged:
        accuracy = result.oof_accuracy
        lines.append(f"  label check unreliable: the out-of-fold accuracy is only {accuracy:.2f}; "
                     "more images, --epochs or a backbone help")  # fmt: skip
    if len(result.dropped) or len(result.excluded):
        lines.append(f"  dropped {len(result.dropped)} duplicate(s), excluded "
                     f"{len(result.excluded)} suspected label error(s) from training")  # fmt: skip
    if folder is not None:
        lines.append(f"  report: {folder / 'report.md'}")
    return "\n".join(lines)


def tile(images: LabelledImages, index: int) -> np.ndarray:
    """The image at ``index`` as a small RGB array, for a contact sheet."""
    if images.pixels is not None:
        image = Image.fromarray(images.pixels[index].squeeze())
    else:
        image = decode_image(Path(images.paths[index]).read_bytes())
    image = image.convert("RGB")
    image.thumbnail((TILE_SIDE, TILE_SIDE))
    return np.asarray(image)


def write_sheets(result: AuditResult, images: LabelledImages, folder: Path) -> list[str]:
    keys, names = result.inventory.keys, result.class_names
    issues = result.issues
    suspects = [] if issues is None else [
        (tile(images, i), f"{short(keys[i])}\n{names[issues.given[r]]} -> "
         f"{names[issues.suggested[r]]}")
        for r, i in enumerate(issues.ranked[:SHOWN].tolist())
    ]  # fmt: skip
    groups = [(g, n) for n, g in enumerate(result.duplicates.near)]
    groups.sort(key=lambda item: (len(np.unique(result.labels[item[0]])) == 1, item[1]))
    copies = [
        (tile(images, i), f"group {n + 1}\n{short(keys[i], 16)}\n{names[result.labels[i]]}")
        for g, n in groups[: SHOWN // 2] for i in g[:4].tolist()
    ][:SHOWN]  # fmt: skip
    written = [
        contact_sheet(suspects, "suspected label errors: given -> suggested",
                      folder / "label_issues.png"),
        contact_sheet(copies, "duplicate groups (under different labels first)",
                      folder / "duplicates.png"),
    ]  # fmt: skip
    return [path.name for path in written if path is not None]


def write_relabel_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "given", "suggested", "given_probability",
                         "suggested_probability", "decision"])  # fmt: skip
        for row in rows:
            writer.writerow([*row.values(), ""])


def write_report(result: AuditResult, images: LabelledImages, folder: Path) -> dict:
    """Write report.json, report.md, relabel.csv and the contact sheets into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    report = to_json(result)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_relabel_csv(label_issue_rows(result), folder / "relabel.csv")
    sheets = write_sheets(result, images, folder)
    (folder / "report.md").write_text(markdown(report, sheets))
    return report
