"""``python -m training drift``: has what the model sees moved away from its validation split?
A report a person reads, from the tests of :mod:`service.core.drift` against the reference the
training run shipped beside the model (``drift_reference.npz``).

Two sources, tested window by window (consecutive runs of ``--window`` images) and all at once:

- ``--folder``: images, classified here with the artifact's ``model.onnx``; the model's full
  outputs are at hand, so the tests are the service's own (:func:`service.core.drift.check_window`):
  ``bbsd`` (a KS test per class), ``knn`` (a KS test of the unknown-input score) and ``label``
  (the predicted classes' shares).
- the prediction log (``--database``): it keeps per prediction the top-1 score, the top-k scores,
  the predicted class and the unknown-input score, not the K per-class scores that ``bbsd``
  needs. Its place is taken by ``confidence``: a KS test of the top-1 score against the
  reference's top-1 scores. ``knn`` and ``label`` are as above.

A window is drifted when any test's corrected p-value is below ``alpha / tests`` (Bonferroni, as
:attr:`service.core.drift.WindowCheck.drifted`). Where labels came back (the log's ``labels``,
or a folder's class sub-folders), the live accuracy of the labelled images is set beside the
two label-free estimates (ATC and the mean confidence), with each one's absolute error.

Written to ``--output``: ``drift_score.png`` (per window, ``-log10`` of the smallest corrected
p-value, with the line a window must cross to count as drifted), ``distributions.png`` (the
reference's and the tested images' top-1 and unknown-input scores) and ``drift.json``. What is
read and tested is :mod:`training.quality.drift_windows`; this module says what it means.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from service.core.drift import ATC, BBSD, KNN, LABEL, MEAN_CONFIDENCE, DriftReference  # noqa: E402
from training import artifacts  # noqa: E402
from training.command_config import DriftConfig  # noqa: E402
from training.config import ConfigError  # noqa: E402
from training.quality.drift_windows import (  # noqa: E402
    CONFIDENCE,
    DATABASE,
    FOLDER,
    Observed,
    drift_figures,
    read_artifact,
    read_folder,
    read_log,
)
from training.quality.monitor import parse_period  # noqa: E402

SMALLEST_P = 1e-16  # the drift score's cap: the p-values are exact to about that
ESTIMATOR_NAMES = {ATC: "ATC", MEAN_CONFIDENCE: "mean confidence"}
DRIFT_SCORE_PLOT, DISTRIBUTIONS_PLOT, FIGURES_FILE = (
    "drift_score.png",
    "distributions.png",
    "drift.json",
)


def advice(figures: dict, reference: DriftReference, observed: Observed) -> list[str]:
    """What to do, from the figures: one sentence per finding."""
    overall, windows = figures["overall"], figures["windows"]
    fired = set(overall["tests_fired"])
    for window in windows:
        fired.update(window["tests_fired"])
    drifted = sum(window["drift"] for window in windows)
    lines = []
    if not fired:
        lines.append(
            "nothing to change: the inputs look like the validation split (a window like it is "
            f"called drifted at most {figures['alpha']:.0%} of the time); run this again as new "
            "inputs come in"
        )
    elif not overall["drift"]:
        lines.append(
            f"{drifted} window(s) drifted but not the period as a whole: look at what came in "
            "then (a burst of unusual inputs, one client, a camera or an upload path that "
            "changed)"
        )
    if fired & {BBSD, CONFIDENCE}:
        now = float(np.mean(observed.top1))
        then = float(np.mean(reference.probabilities.max(axis=1)))
        lines.append(
            f"the model's scores moved: its mean top-1 score is {now:.3f}, against {then:.3f} "
            f"on the validation split, so it is {'less' if now < then else 'more'} sure of its "
            "answers and its accuracy has likely moved too (the ATC estimate is "
            f"{overall['estimated_accuracy'][ATC]:.3f}, against the validation accuracy "
            f"{reference.accuracy:.3f})"
        )
    if KNN in fired:
        lines.append(
            "the inputs are less like the training images (the unknown-input score moved): look "
            "at what the service captured, label it ('python -m training captured'), and add it "
            "to the training data"
        )
    if LABEL in fired:
        moved = overall.get("moved_classes") or []
        named = ", ".join(
            f"{c['label']} ({'more' if c['share'] > c['reference_share'] else 'less'} often)"
            for c in moved
        )
        lines.append(
            "the predicted classes' mix changed"
            + (f": {named}" if named else "")
            + (
                "; with only this test firing, the classes come at other rates but the images "
                "look as before: the model may still be right, watch the estimates and the live "
                "accuracy ('python -m training monitor')"
                if fired == {LABEL}
                else "; see the confusion matrix of 'python -m training monitor' for classes "
                "confused for others"
            )
        )
    if observed.kind == FOLDER and overall["labelled"] and len(windows) > 1:
        lines.append(
            "the windows follow the files' sorted order, so with class sub-folders each window "
            "holds mostly one class and its label test measures the layout: read the line of all "
            "the images, or test a folder in the order the images came"
        )
    accuracy = overall["accuracy"]
    if observed.kind == DATABASE and not overall["labelled"]:
        lines.append(
            "no labels came back for these predictions: send some to the service's POST "
            "/feedback, and the live accuracy is measured here and by 'python -m training "
            "monitor'"
        )
    elif accuracy is not None and accuracy < reference.accuracy - 0.05:
        lines.append(
            f"the live accuracy {accuracy:.3f} of the {overall['labelled']} labelled images is "
            f"below the validation accuracy {reference.accuracy:.3f}"
        )
    if fired - {LABEL}:
        lines.append(
            "the images changed: check the cameras and sources sending them, collect labels for "
            "the recent inputs, train again on the new data, and roll the new model out through "
            "the shadow ('python -m training rollout')"
        )
    return lines


def plot_drift_score(figures: dict, path: Path) -> None:
    """Per window, ``-log10`` of the smallest corrected p-value, against the window's end (the
    log) or its number (a folder), with the line a window must cross to count as drifted."""
    windows = figures["windows"]
    timed = "to_at" in windows[0]
    x = (
        [datetime.datetime.fromtimestamp(w["to_at"], datetime.UTC) for w in windows]
        if timed
        else [w["window"] for w in windows]
    )
    # The p-values are exact to about 1e-16 (the Kolmogorov series): the score is capped there.
    score = [-math.log10(max(w["smallest_p_value"], SMALLEST_P)) for w in windows]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot(x, score, marker="o", label="-log10(smallest corrected p-value)")
    drifted = [(a, b) for a, b, w in zip(x, score, windows, strict=True) if w["drift"]]
    if drifted:
        axes.scatter(*zip(*drifted, strict=True), color="tab:red", zorder=3, label="drifted")
    tests = len(figures["tests"])
    level = figures["alpha"] / max(tests, 1)
    axes.axhline(
        -math.log10(level),
        color="grey",
        linestyle="--",
        label=f"-log10(alpha / tests) = -log10({figures['alpha']:g} / {tests})",
    )
    axes.set_xlabel("window end (UTC)" if timed else "window")
    axes.set_ylabel(f"-log10(p), capped at {-math.log10(SMALLEST_P):g}")
    axes.set_title(f"Drift per window of {figures['window']} images")
    axes.grid(True, alpha=0.3)
    axes.legend()
    if timed:
        figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_distributions(reference: DriftReference, observed: Observed, path: Path) -> None:
    """The reference's and the tested images' top-1 scores and unknown-input scores."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    bins = np.linspace(0, 1, 21)
    left.hist(
        reference.probabilities.max(axis=1), bins=bins, density=True, alpha=0.5, label="reference"
    )
    left.hist(observed.top1, bins=bins, density=True, alpha=0.5, label="tested")
    left.set_xlabel("top-1 calibrated score")
    left.set_ylabel("density")
    left.set_title("Top-1 score")
    tested = None if observed.ood is None else observed.ood[np.isfinite(observed.ood)]
    if reference.ood_scores is not None and tested is not None and len(tested):
        both = np.concatenate([reference.ood_scores, tested])
        edges = np.linspace(float(both.min()), float(both.max()) + 1e-9, 31)
        right.hist(reference.ood_scores, bins=edges, density=True, alpha=0.5, label="reference")
        right.hist(tested, bins=edges, density=True, alpha=0.5, label="tested")
        right.set_xlabel("unknown-input score (higher: less like the training images)")
    else:
        right.text(0.5, 0.5, "no unknown-input scores", ha="center", va="center")
    right.set_title("Unknown-input score")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_drift(config: DriftConfig) -> dict:
    """Read the artifact and the images (a folder, or the log), test them, and write the plots
    and ``drift.json`` into ``--output``; the figures."""
    url = config.database or os.environ.get("DATABASE_URL", "")
    if config.folder is None and not url:
        raise ConfigError(
            "--database or --folder: name the prediction log (the service's DATABASE_URL) or a "
            "folder of images to test"
        )
    if config.folder is not None and config.database:
        raise ConfigError("--database and --folder: test one of them at a time")
    if config.folder is None:
        parse_period(config.since)  # a bad --since is a usage error, before anything is read
    artifact, contract, reference = read_artifact(config)
    if config.folder is not None:
        observed = read_folder(config, artifact)
    else:
        observed, version = read_log(config, contract)
        config = replace(config, model_version=version)
    figures = drift_figures(config, contract, reference, observed)
    figures["advice"] = advice(figures, reference, observed)
    figures["plots"] = {"drift_score": DRIFT_SCORE_PLOT, "distributions": DISTRIBUTIONS_PLOT}
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    plot_drift_score(figures, output / DRIFT_SCORE_PLOT)
    plot_distributions(reference, observed, output / DISTRIBUTIONS_PLOT)
    artifacts.write_json(output / FIGURES_FILE, figures)
    figures["written"] = str(output)
    return figures


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _estimates(part: dict) -> str:
    return ", ".join(
        f"{ESTIMATOR_NAMES[name]} {value:.3f}" for name, value in part["estimated_accuracy"].items()
    )


def _accuracy(part: dict) -> str:
    if part["accuracy"] is None:
        return "no labels"
    errors = ", ".join(
        f"{ESTIMATOR_NAMES[name]} {value:.3f}" for name, value in part["estimate_error"].items()
    )
    return f"{part['accuracy']:.3f} of {part['labelled']} labelled (error {errors})"


def format_drift(figures: dict) -> str:
    """The figures as the lines the command prints."""
    reference, source, tests = figures["reference"], figures["source"], list(figures["tests"])
    model = figures["model"]
    if source["kind"] == DATABASE:
        tested = (
            f"the prediction log {source['where']}, the last {source['since']}, model version "
            f"{source['model_version']}: {source['images']} predictions, "
            f"{source['labelled']} labelled"
        )
    else:
        tested = (
            f"the folder {source['where']}: {source['images']} images, {source['labelled']} "
            "labelled by their class sub-folder"
            + (f", {source['skipped']} unreadable files left out" if source["skipped"] else "")
        )
    lines = [
        f"drift report of {model['name']} {model['version']} ({figures['artifact']})",
        f"reference: {reference['images']} held-out validation images, validation accuracy "
        f"{reference['validation_accuracy']:.4f}, ATC threshold {reference['atc_threshold']:.4f}",
        f"tested: {tested}",
    ]
    lines += [f"test {name}: {description}" for name, description in figures["tests"].items()]
    lines += [f"test {name} is absent: {why}" for name, why in figures["absent"].items()]
    level = figures["alpha"] / max(len(tests), 1)
    lines.append(
        f"a window of {figures['window']} images is drifted when a test's corrected p-value is "
        f"below alpha / tests = {figures['alpha']:g} / {len(tests)} = {level:.4g}"
        + (" (times in UTC)" if source["kind"] == DATABASE else "")
    )
    span = 19 if source["kind"] == DATABASE else 24
    header = (
        f"{'window':>6}  {'from':<{span}}  {'to':<{span}}  {'images':>6}  "
        + "  ".join(f"{name:>10}" for name in tests)
        + f"  {'drift':<5}  {'ATC':>5}  {'mean conf':>9}  live accuracy"
    )
    lines += ["", header]
    for window in figures["windows"]:
        lines.append(
            f"{window['window']:>6}  {_short(window['from'], span):<{span}}  "
            f"{_short(window['to'], span):<{span}}  {window['images']:>6}  "
            + "  ".join(f"{_p(window['p_values'].get(name)):>10}" for name in tests)
            + f"  {'yes' if window['drift'] else 'no':<5}  "
            f"{window['estimated_accuracy'][ATC]:>5.3f}  "
            f"{window['estimated_accuracy'][MEAN_CONFIDENCE]:>9.3f}  {_accuracy(window)}"
        )
    overall = figures["overall"]
    fired = ", ".join(overall["tests_fired"])
    lines += [
        "",
        f"all {overall['images']} images: drift {f'yes ({fired})' if overall['drift'] else 'no'}"
        + "; p-values "
        + ", ".join(f"{name} {_p(p)}" for name, p in overall["p_values"].items()),
        f"estimated accuracy: {_estimates(overall)}; live accuracy: {_accuracy(overall)}",
    ]
    if overall["mean_window_error"]:
        lines.append(
            "mean error per labelled window: "
            + ", ".join(
                f"{ESTIMATOR_NAMES[name]} {value:.3f}"
                for name, value in overall["mean_window_error"].items()
            )
        )
    lines.append(
        f"drifted windows: {figures['drifted_windows']} of {len(figures['windows'])} "
        f"({figures['drifted_share']:.0%})"
    )
    moved = overall["moved_classes"]
    if moved:
        lines.append("classes whose predicted share moved (reference -> tested):")
        lines += [f"  {c['label']}: {c['reference_share']:.1%} -> {c['share']:.1%}" for c in moved]
    else:
        lines.append("classes whose predicted share moved: none")
    lines.append("what to do:")
    lines += [f"  - {line}" for line in figures["advice"]]
    if "written" in figures:
        written = Path(figures["written"])
        lines.append(
            f"wrote {written / DRIFT_SCORE_PLOT}, {written / DISTRIBUTIONS_PLOT} and "
            f"{written / FIGURES_FILE}"
        )
    return "\n".join(lines)
