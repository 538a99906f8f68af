"""Verity's HTTP service (imports inference, never torch or training).

- app.py: `create_app(settings, registry, audit, engine_factory)`, the factory `verity serve` runs.
- settings.py: `Settings` (VERITY_* variables and an optional file), `load_settings`.
- routes_v1.py / routes_v2.py: the /v1 API and the Open Inference Protocol under /v2; oip_codec.py: the
  protocol's request and answer encoding.
- service.py: the prediction path (decode off the loop, the scoring pipeline of `inference.pipeline` with
  the micro-batcher's predict, audit, answer); the /v1 body and the audit row are written from its result.
- registry.py: models under <models_dir>/<name>/<version>/model.onnx, defaults, hot reload.
- auth.py (hashed station keys), audit.py (SQLite WAL audit log, image store), metrics.py, logs.py,
  middleware.py (request_id, streamed body limit, access log, Host and cross-site checks), errors.py,
  schemas.py, deps.py.
- cli.py: `verity serve|keys|audit`; feedback.py: `verity audit confirmed` (cases to ingest).
"""
