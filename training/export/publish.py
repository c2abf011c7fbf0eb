"""Publish a checked artifact to the BentoML model store as ``<name>:<version>``."""

from __future__ import annotations

import shutil
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from service.core.contract import ModelContract

# What the service needs from a published model; everything else stays in the artifact folder.
# The drift reference goes with it when the model has one (contract.drift_reference).
PUBLISHED_FILES = ("model.onnx", "labels.json", "metadata.json")


class PublishError(Exception):
    """The artifact cannot be published as it is."""


def publish_artifact(
    folder: Path, contract: ModelContract, export: dict | None, git_commit: str | None = None
) -> str:
    """Import ``model.onnx``, ``labels.json``, ``metadata.json`` and the drift reference into
    the model store.

    BentoML writes the model into a temporary folder and moves it into the store only when the
    ``with`` block ends without error, so the store gets the whole model or nothing.

    Args:
        folder: a complete artifact folder.
        contract: the model's contract, as the run built it.
        export: the export report of the parity gate that passed; None if none ran.

    Returns:
        The model tag, ``name:version``.
    """
    if contract.drift_reference and not (folder / contract.drift_reference).is_file():
        raise PublishError(
            f"{folder / contract.drift_reference} is missing: its model was trained with a drift "
            "reference; train again to re-create it"
        )
    if export is None or not (folder / "model.onnx").is_file():
        raise PublishError(
            f"{folder} has no checked model.onnx: run 'python -m training export --artifact "
            f"{folder}' first"
        )
    try:
        existing = bentoml.models.get(contract.tag)
    except NotFound:
        existing = None
    if existing is not None:
        # A version names one training run, so the store already holds this very model.
        print(f"the model store already holds {existing.tag}; left unchanged")
        return str(existing.tag)
    with bentoml.models.create(
        contract.tag,
        labels={"task": "image-classification", "format": "onnx", "source": "training"},
        metadata={
            **contract.to_store_metadata(),
            "parity_max_abs_diff": export["parity"]["max_abs_diff"],
            "git_commit": git_commit or "",
        },
    ) as model:
        print(f"publishing {model.tag} to the model store", flush=True)
        names = PUBLISHED_FILES + ((contract.drift_reference,) if contract.drift_reference else ())
        for name in names:
            shutil.copy2(folder / name, model.path_of(name))
    return str(model.tag)
