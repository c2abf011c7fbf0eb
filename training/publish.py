"""Publish a checked artifact to the BentoML model store as ``<name>:<version>``."""

from __future__ import annotations

import shutil
from pathlib import Path

from training import artifacts

# What the service needs from a published model; everything else stays in the artifact folder.
PUBLISHED_FILES = ("model.onnx", "labels.json", "metadata.json")


class PublishError(Exception):
    """The artifact cannot be published as it is."""


def publish_artifact(folder: Path) -> str:
    """Import ``model.onnx``, ``labels.json`` and ``metadata.json`` into the model store.

    BentoML writes the model into a temporary folder and moves it into the store only when the
    ``with`` block ends without error, so the store gets the whole model or nothing.

    Returns:
        The model tag, ``name:version``.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    folder = artifacts.resolve_artifact(folder)
    metadata = artifacts.read_json(folder / "metadata.json")
    if "export" not in metadata or not (folder / "model.onnx").is_file():
        raise PublishError(
            f"{folder} has no checked model.onnx: run 'python -m training export --artifact "
            f"{folder}' first"
        )
    tag = f"{metadata['name']}:{metadata['version']}"
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        # A version names one training run, so the store already holds this very model.
        print(f"the model store already holds {existing.tag}; left unchanged")
        return str(existing.tag)
    parity = metadata["export"]["parity"]
    with bentoml.models.create(
        tag,
        labels={"task": "image-classification", "format": "onnx", "source": "training"},
        metadata={
            "labels": metadata["labels"],
            "image": metadata["image"],
            "test_accuracy": metadata["metrics"]["test_accuracy"],
            "data_fingerprint": metadata["data"]["fingerprint"],
            "parity_max_abs_diff": parity["max_abs_diff"],
            "opset": metadata["export"]["opset"],
            "git_commit": metadata.get("git_commit") or "",
        },
    ) as model:
        for name in PUBLISHED_FILES:
            shutil.copy2(folder / name, model.path_of(name))
    return str(model.tag)
