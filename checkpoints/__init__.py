"""The shipped default models as package data (`verity.checkpoints`): <name>/<version>/model.onnx, its
INT8 variant where it passed its gate, and card.json. An installed `verity serve` serves them from any
working folder when VERITY_MODELS_DIR is unset (api.settings.default_models_dir)."""
