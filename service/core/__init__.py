"""The model core: the contract, the one preprocessing, the onnxruntime classifier and
postprocessing. It imports no web framework, no BentoML and no settings (the model store is
:mod:`service.registry`)."""
