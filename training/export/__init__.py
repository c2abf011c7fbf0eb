"""From a fitted model to a served one: the ONNX conversion, the parity gate, int8, the artifact
folder renamed into place when complete, re-export and publishing to the model store."""
