"""Genuine references: the right holder's genuine images of a product, and the check of a query
against them. (The training embeddings that novelty is measured against are another thing, the
training bank in `inference/bank.py`.)

Import each name from the module that defines it; this file imports nothing, so that the engine can
use `patch_check` without loading the store.

    names        product and model names the store accepts (validate_product, validate_model_name)
    errors       ReferenceStoreError and its kinds
    events       the append-only events log: Reference, Enrolment, replay, flock, append
    cache        the per-engine index and its embeddings cache file
    check        embedding an image as the server scores it; leave-one-out calibration; the check
    patch_check  the check on local features: a product's patch signature
    store        ReferenceStore, which keeps the images and events and answers the check
"""
