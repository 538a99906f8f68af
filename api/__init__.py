"""Verity's HTTP service (imports inference, never torch or training).

- app.py: `create_app(settings, registry, audit, engine_factory)`, the factory `verity serve` runs.
- settings.py: `Settings` (VERITY_* variables and an optional file), `load_settings`.
- routes/: one router per module: v1.py (/v1), v2.py (the Open Inference Protocol under /v2, encoded by
  oip_codec.py, oip_response.py), references.py (/v1/references), history.py (/v1/history).
- service.py: the prediction path (decode off the loop, the scoring pipeline of `inference.pipeline` with
  the micro-batcher's predict, audit, answer); the /v1 body and the audit row are written from its result.
- registry.py: models under <models_dir>/<name>/<version>/model.onnx, defaults, hot reload.
- errors.py: the error shapes, each status's meaning for OpenAPI, and how decode and reference store
  errors become HTTP errors.
- auth.py (hashed station keys), audit.py with audit_records.py, audit_sql.py, audit_postgres.py and
  audit_migrate.py (the audit log: SQLite WAL or PostgreSQL; the image store), metrics.py, logs.py,
  middleware.py (request_id, streamed body limit, access log, Host and cross-site checks), limits.py
  (rate and decode slots per key), http_protocol.py (request-head deadline), docs.py (offline Swagger UI),
  schemas.py, deps.py; console/ (the inspection console's page).
- cli.py: `verity serve|keys|audit`; feedback.py: `verity audit confirmed` (cases to ingest);
  refs_cli.py: `verity refs`; reference_admin.py: what `verity refs` and /v1/references share.
"""
