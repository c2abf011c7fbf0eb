"""The BentoML model store: a model by tag, or the one a service serves when nothing names one."""

from __future__ import annotations

from pathlib import Path

from service.core.classifier import ModelLoadError, ModelSource, model_in_folder

# The model served when nothing names one: <name>:latest from the BentoML model store.
DEFAULT_MODEL_NAME = "animals"


def model_in_store(tag: str) -> ModelSource:
    """The folder of model ``tag`` (``name:version`` or ``name:latest``) in the BentoML model
    store."""
    import bentoml  # the model store; a model from a folder needs none of BentoML
    from bentoml.exceptions import BentoMLException

    try:
        model = bentoml.models.get(tag)
    except BentoMLException as exc:
        raise ModelLoadError(
            f"model {tag} is not in the BentoML model store: run 'make train', or set MODEL_PATH "
            "to an artifact folder"
        ) from exc
    return ModelSource(Path(model.path), f"model {model.tag}")


def locate_model(model_path: str = "", model_tag: str = "") -> ModelSource:
    """``model_path`` (an artifact folder) if set, else ``model_tag`` from the model store, else
    ``<DEFAULT_MODEL_NAME>:latest``."""
    if model_path:
        return model_in_folder(Path(model_path), f"MODEL_PATH={model_path}")
    return model_in_store(model_tag or f"{DEFAULT_MODEL_NAME}:latest")
