"""Which model version the service's source names now: the ``latest`` link of an artifact folder
(``MODEL_PATH``, e.g. on a volume every replica mounts) or a ``name:latest`` tag of the BentoML
model store. The service polls it (:mod:`service.http.model_swap`) and swaps to a new version
without a restart, once that version has passed the start-up checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.core.classifier import (
    Classifier,
    ModelLoadError,
    ModelSource,
    load_classifier,
    smoke_test,
)
from service.registry.model_store import locate_model

# A check's outcomes, as the admin call answers them and the metrics count them.
UNCHANGED, SWAPPED, REFUSED = "unchanged", "swapped", "refused"


@dataclass(frozen=True)
class Check:
    """What one look at the source found."""

    outcome: str  # UNCHANGED, SWAPPED or REFUSED
    folder: Path | None  # the version the source names (None: it could not be read)
    classifier: Classifier | None = None  # the new version, loaded and checked (SWAPPED)
    reason: str = ""  # why it was refused (REFUSED)


def load_checked(source: ModelSource, threads: int) -> Classifier:
    """The model at ``source``, loaded and checked as at start-up: its contract and its
    signature (:func:`~service.core.classifier.load_classifier`), then one inference
    (:func:`~service.core.classifier.smoke_test`).

    Raises:
        ModelLoadError: the model cannot be served; the message is one line.
    """
    classifier = load_classifier(source, threads)
    smoke_test(classifier)
    return classifier


class SourceWatch:
    """Compares the version the source names with the one served, and loads a new one.

    A version that failed its checks is not loaded again until the source names another (or a
    check is forced), so a broken publication costs one load, not one per poll.

    Args:
        model_path: ``MODEL_PATH`` (an artifact folder or its ``latest`` link), or empty.
        model_tag: the model-store tag served when ``model_path`` is empty.
        threads: onnxruntime threads of a loaded version, as the served one has.
        served: the folder of the version served now.
    """

    def __init__(self, model_path: str, model_tag: str, threads: int, served: Path | None):
        self.model_path, self.model_tag, self.threads = model_path, model_tag, threads
        self.served = served
        self.refused: Path | None = None

    @property
    def watchable(self) -> bool:
        """Whether the source can name another version: a folder path (its link may move) or a
        ``:latest`` tag. A pinned ``name:version`` never changes."""
        return bool(self.model_path) or self.model_tag.endswith(":latest")

    def named(self) -> ModelSource:
        """The version the source names now, its folder resolved (raises ModelLoadError)."""
        return locate_model(self.model_path, self.model_tag)

    def check(self, force: bool = False) -> Check:
        """Look at the source once; load and check a version other than the served one.

        Args:
            force: load the named version even if it was refused before (an operator's call).
        """
        try:
            source = self.named()
        except ModelLoadError as error:
            return Check(REFUSED, None, reason=str(error))
        folder = source.folder
        if folder == self.served or (folder == self.refused and not force):
            return Check(UNCHANGED, folder)
        try:
            classifier = load_checked(source, self.threads)
        except ModelLoadError as error:
            self.refused = folder
            return Check(REFUSED, folder, reason=str(error))
        self.served, self.refused = folder, None
        return Check(SWAPPED, folder, classifier)
