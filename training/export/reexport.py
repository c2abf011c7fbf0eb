"""``python -m training export``: export an existing artifact again (through the parity gate)
and publish it."""

from __future__ import annotations

import dataclasses

import keras

from service.core.contract import ModelContract
from training import artifacts
from training.command_config import ExportConfig
from training.config import TrainConfig
from training.data.prepare import prepare_data
from training.export.convert import OPSET, ExportError
from training.export.publish import publish_artifact
from training.export.write import export_model
from training.model import cam
from training.quality.detector import DETECTOR_FILE, UnknownInputDetector


def run_export(config: ExportConfig) -> str | None:
    """Export the artifact of ``config`` again and publish it.

    Returns:
        The model-store tag, or None when ``--no-publish``.
    """
    folder = artifacts.resolve_artifact(config.artifact)
    metadata = artifacts.read_json(folder / "metadata.json")
    contract = dataclasses.replace(ModelContract.from_metadata(metadata), opset=OPSET)
    if config.precision is not None:
        contract = dataclasses.replace(contract, precision=config.precision)
    trained = TrainConfig.from_dict(metadata["config"])
    data = prepare_data(trained)
    if data.images.fingerprint != contract.data_fingerprint:
        raise ExportError(
            f"the data {contract.data_source} changed since {folder} was trained "
            "(fingerprint differs), so its held-out images cannot be rebuilt: train again"
        )
    model = keras.saving.load_model(folder / "model.keras")
    # The map follows the model's head (a model exported before it existed gains it).
    contract = dataclasses.replace(contract, **cam.contract_fields(model))
    metadata |= contract.to_metadata() | {"data": metadata["data"]}
    detector = None
    if contract.has_detector:
        if not (folder / DETECTOR_FILE).is_file():
            raise ExportError(
                f"{folder / DETECTOR_FILE} is missing: its model was trained with an unknown-input "
                "detector; train again to re-create it"
            )
        detector = UnknownInputDetector.load(folder / DETECTOR_FILE)
    metadata["export"] = export_model(folder, model, data, contract, trained.seed, detector)
    artifacts.write_json(folder / "metadata.json", metadata)
    print(f"exported {folder / 'model.onnx'}")
    if not config.publish:
        return None
    tag = publish_artifact(folder, contract, metadata["export"], metadata.get("git_commit"))
    print(f"published to the BentoML model store as {tag}")
    return tag
