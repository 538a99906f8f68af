"""Verity on Ray Serve (`pip install '.[ray]'`): the same FastAPI app as `verity serve`, one per replica.

Each replica builds the app with `create_app()` from its VERITY_* settings (passed to every replica in
its runtime environment), so it keeps every guarantee of `verity serve`: each verdict in the audit log
before it is answered, keys, rate limits, the open-set gate, the preprocessing spec of each model. The
replicas share state the way `verity serve --workers N` does: through the audit store, which must then
be PostgreSQL (VERITY_AUDIT_DB=postgresql://...), one for every replica on every node.

Requests are not queued twice: Serve's router hands a request to a replica with room at once, and inside
the replica Verity's micro-batcher gathers the concurrent ones into model batches. A replica takes at
least twice the batch size at once (`max_ongoing_requests`), so batches can fill (a replica that may
take fewer than a batch never fills one).

    VERITY_AUDIT_DB=postgresql://... serve run verity.api.ray_serve:app_builder replicas=2
    serve run verity.api.ray_serve:app_builder min_replicas=1 max_replicas=4   # autoscaling
"""

from __future__ import annotations

import os
from typing import Any

from verity.api.app import create_app
from verity.api.settings import Settings

SETTINGS_PREFIX = "VERITY_"


def batch_size(env: dict[str, str]) -> int:
    """The replicas' model batch size (VERITY_BATCH_MAX_SIZE, or the setting's default)."""
    default = Settings.model_fields["batch_max_size"].default
    return int(env.get(f"{SETTINGS_PREFIX}BATCH_MAX_SIZE", default))


def replica_options(replicas: int | None, min_replicas: int | None, max_replicas: int | None,
                    env: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """`serve.deployment` options: fixed replicas or an autoscaling range, room for two batches each."""
    batch = batch_size(env)
    options: dict[str, Any] = {
        "max_ongoing_requests": max(2 * batch, 16),
        "ray_actor_options": {"runtime_env": {"env_vars": env}, "num_cpus": 1},
        "health_check_period_s": 5,
    }
    if min_replicas is not None or max_replicas is not None:
        low = 1 if min_replicas is None else min_replicas
        high = max(low, max_replicas or low)
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            # Scale out when a replica holds more than one batch on average.
            "target_ongoing_requests": batch,
        }
    else:
        options["num_replicas"] = replicas or 1
    return options


def verity_deployment(replicas: int | None = 2, *, min_replicas: int | None = None,
                      max_replicas: int | None = None, env: dict[str, str] | None = None) -> Any:  # fmt: skip
    """The Serve deployment of Verity's app; `env` the VERITY_* settings of every replica (default: this
    process's). Returns the deployment; `.bind()` it and `serve.run` it."""
    from ray import serve

    given = os.environ if env is None else env
    settings_env = {key: value for key, value in given.items() if key.startswith(SETTINGS_PREFIX)}
    options = replica_options(replicas, min_replicas, max_replicas, settings_env)

    @serve.deployment(name="verity", **options)
    @serve.ingress()
    class VerityReplica:
        """One replica: the app `verity serve` runs, built when the replica starts."""

        def __serve_build_asgi_app__(self) -> Any:
            return create_app()

    return VerityReplica


def app_builder(args: dict[str, str]) -> Any:
    """The `serve run` target: `replicas=N`, or `min_replicas=` and `max_replicas=` to autoscale."""
    names = ("replicas", "min_replicas", "max_replicas")
    numbers = {key: int(value) for key, value in args.items() if key in names}
    unknown = sorted(set(args) - set(numbers))
    if unknown:
        raise ValueError(f"Unknown arguments {', '.join(unknown)}: replicas, min_replicas, max_replicas.")
    return verity_deployment(numbers.get("replicas", 2), min_replicas=numbers.get("min_replicas"),
                             max_replicas=numbers.get("max_replicas")).bind()  # fmt: skip
