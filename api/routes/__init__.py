"""The HTTP routes, one router per module; `api/app.py` includes each. Routes stay thin: the work is in
`api/service.py` (predictions) and `api/registry.py` (models), the error shape in `api/errors.py`.

    v1          /v1: predict, batch, models, feedback, reload, health, metrics
    v2          the Open Inference Protocol under /v2 (requests read by `api/oip_codec.py`, answers
                written by `api/oip_response.py`)
    references  /v1/references: genuine reference images per product (admin)
    history     /v1/history: the caller's recent verdicts, for the console
"""
