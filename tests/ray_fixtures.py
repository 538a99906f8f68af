"""A local Ray on loopback serving the Verity app (api/ray_serve.py), for tests and benchmarks/ray_bench."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from postgres_fixtures import free_port


@contextmanager
def local_ray_serve(env: dict[str, str], replicas: int = 2) -> Iterator[str]:
    """Ray started here on two CPUs, `replicas` of the app behind Serve's HTTP proxy; yields its URL and
    shuts both down after."""
    import ray
    from ray import serve

    from verity.api.ray_serve import verity_deployment

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
             log_to_driver=False, configure_logging=False)  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(verity_deployment(replicas, env=env).bind(), name="verity", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
