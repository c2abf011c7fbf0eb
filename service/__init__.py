"""Image-classifier serving: the model core, the HTTP service and the offline CLI.

- :mod:`service.core`: what a model promises and how one image becomes an answer (contract,
  preprocessing, the onnxruntime classifier, postprocessing). No web framework, no settings;
  the training job imports this and nothing else of the service.
- :mod:`service.http`: the BentoML service (routes, the Open Inference Protocol, errors,
  middleware, metrics, settings, adaptive batching, the page).
- :mod:`service.cli`: the offline batch classifier (sharded runs, decoding processes, merge).

``http`` and ``cli`` import ``core`` and never each other. The entry points users and manifests
call stay here: ``service.service:ImageClassifier`` and ``python -m service.predict``.
"""
