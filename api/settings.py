"""Service settings, read from `VERITY_*` environment variables and an optional dotenv-style file.

Precedence (pydantic-settings): explicit constructor arguments > environment > settings file > defaults.
`verity serve --config FILE` or `VERITY_CONFIG=FILE` names the file.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeLimits
from verity.inference.dicos_report import DEFAULT_UID_ROOT, UID_ROOT_MAX, UID_ROOT_PATTERN
from verity.inference.references.store import DEFAULT_REFERENCES_DIR
from verity.inference.tiling import TilingOptions
from verity.inference.vocabulary import MODALITIES

MiB = 1024 * 1024
# The names a loopback server is reached by; allowed_hosts' default.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or the name localhost) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name that may resolve anywhere: treat as exposed


def default_models_dir() -> Path:
    """The one models folder when VERITY_MODELS_DIR is unset: the package's `verity.checkpoints` (the
    checkout's checkpoints/ in an editable install, the shipped defaults in a wheel), whatever the working
    folder; ./checkpoints only when the package has none. A `verity train` run elsewhere never hides the
    shipped models: its models reach the server by being put here (or VERITY_MODELS_DIR) and promoted."""
    shipped = importlib.util.find_spec("verity.checkpoints")
    if shipped is not None and shipped.submodule_search_locations:
        return Path(next(iter(shipped.submodule_search_locations)))
    return Path("checkpoints")


class Settings(BaseSettings):
    """Everything an operator may tune; every field is `VERITY_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="VERITY_", extra="ignore", env_file_encoding="utf-8")

    # Models: <models_dir>/<name>/<version>/model.onnx, several versions side by side. Unset: the package's
    # checkpoints (default_models_dir), whatever the working folder, so the shipped defaults are always
    # there. Said at start-up and by /readyz.
    models_dir: Path = Field(default_factory=default_models_dir)
    # The modalities this server serves: /readyz is not ready while one of them has no model.
    modalities: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(MODALITIES))
    # modality -> "name" or "name/version"; unpinned modalities serve their newest version that is not
    # marked weak. VERITY_PINNED_MODELS='photo=photo-default,xray=xray-default/1.1.0' or the same as JSON.
    pinned_models: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    provider: str | None = None
    # Which file variant to serve: "auto" takes model.int8.onnx on CPU (written only when it passed its
    # accuracy gate) and model.fp16.onnx on CUDA when present; "fp32" always serves model.onnx.
    precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    # Where TensorRT keeps its compiled engines between starts (GPU servers only).
    engine_cache_dir: Path | None = None
    intra_op_threads: int = Field(1, ge=1, le=64)
    warmup: bool = True
    # Load models in the background so /healthz answers at once and /readyz says 503 until warm.
    background_load: bool = True
    # After a load, freeze what it left out of the cyclic collector's scans (api/registry.freeze_long_lived):
    # a server's default. A process that builds many apps (a test run) turns it off: each freeze there
    # begins with a full collection of everything the process holds.
    gc_freeze: bool = True

    # Request limits. The body limit is enforced while the body streams in, before it is all read.
    max_upload_bytes: int = Field(20 * MiB, ge=1024)
    max_batch_bytes: int = Field(64 * MiB, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1)
    # Decode budgets (inference/decode_limits.py, DecodeLimits), each checked before any pixel is decoded and
    # refused with a 413 and its own code. Bytes of decoded samples (width x height x depth x samples x
    # bytes per sample): a 280 KB TIFF of 64 samples decoded to 256 MB. A server decodes an 8-bit RGB
    # image into about 2.3 times this, so the default keeps one upload under 300 MB: 33 MP of RGB pass.
    max_decoded_bytes: int = Field(DEFAULT_LIMITS.max_decoded_bytes, ge=MiB)
    # Scans of a progressive JPEG, each a pass over the whole image (20 ms at 36 MP here): encoders write
    # 10-20; 5,000 empty ones in 551 KB took 10-100 s. The default costs at most about 0.7 s more.
    max_jpeg_scans: int = Field(DEFAULT_LIMITS.max_jpeg_scans, ge=1)
    # JPEG marker segments, PNG chunks, GIF blocks and DICOM elements one file may hold, each parsed in
    # Python: 20 MB of empty ones took 2-9 s. Real images hold tens to a few thousand.
    max_image_segments: int = Field(DEFAULT_LIMITS.max_image_segments, ge=100)
    # The one items cap of every route, checked on the declared count before anything is decoded: files
    # of a /v1 batch, elements (images) of a /v2 BYTES input, N of a /v2 FP32 [N, C, S, S] input. A /v2
    # JSON body may also hold no more numbers than this many model inputs need.
    max_batch_files: int = Field(16, ge=1, le=256)
    # Nesting depth of a /v2 JSON body, checked before it is parsed. A real one nests 7 deep (body,
    # inputs, a tensor, data of rank 4); 100,000 nested "[" made Python's parser fail with a 500.
    max_json_depth: int = Field(16, ge=8, le=500)

    # Concurrent decodes (threadpool). About the core count: more only makes every decode slower and
    # stretches the latency tail; waiting requests queue in arrival order instead.
    decode_concurrency: int = Field(default_factory=lambda: max(2, os.cpu_count() or 2), ge=1, le=256)

    # Fairness between API keys (api/limits.py); every caller without a key shares the one "anonymous".
    # Requests per second per key, as a token bucket of rate_limit_burst (0 turns it off): far above what
    # a station's officers send, far below what floods a small server. Over it: 429 with Retry-After.
    rate_limit_per_s: float = Field(20.0, ge=0.0)
    rate_limit_burst: int = Field(40, ge=1)
    # Decode slots kept for keys with nothing decoding, so one key's slow files cannot make every other
    # station wait (two hostile JPEGs in both slots made an ordinary predict wait 8.7 s).
    decode_reserve: int = Field(1, ge=0, le=255)
    # Decodes one key runs at once. Unset: decode_concurrency - decode_reserve (at least 1).
    decodes_per_key: int | None = Field(None, ge=1, le=256)
    # Decodes one key may have waiting for a slot (two full batches); one more is a 429 with Retry-After.
    decode_queue_per_key: int = Field(32, ge=0, le=4096)

    # Connections (`verity serve`). uvicorn has no header or body read timeout of its own: a request head
    # trickled a byte at a time held its connection 21 s and more, a body 36 s and more.
    # The request head must arrive within this of the connection opening or of the previous answer, else
    # the connection is closed (with a 408 when it had sent anything): api/http_protocol.py.
    header_timeout_s: float = Field(10.0, gt=0.0, le=300.0)
    # The body must arrive within body_timeout_s of the head, plus a second for every body_min_rate bytes
    # received, else 408: a trickle is cut off after about 10 s, while a 20 MB upload over a 128 kbit/s
    # link (16 KiB/s) still has the 21 minutes it needs.
    body_timeout_s: float = Field(10.0, gt=0.0, le=3600.0)
    body_min_rate: int = Field(16 * 1024, ge=1)
    # Idle keep-alive connections are closed after this (uvicorn's timeout_keep_alive). Longer than the 5 s
    # after which client pools such as httpx's drop an idle connection themselves, so the client closes
    # it first: a server closing an idle connection just as the client sends on it fails that request
    # (with uvicorn's 5 s, a ReadError in 1 of 10 soaks, benchmarks/pg_soak.py). The head deadline above
    # closes an idle connection at header_timeout_s anyway.
    keep_alive_timeout_s: int = Field(10, ge=1, le=300)
    # Open connections plus requests in progress, per worker process (uvicorn's limit_concurrency); past
    # it uvicorn answers 503 at once. Bounds what many or slow clients hold (sockets, bodies in memory),
    # well above what a fleet of stations keeps open.
    max_concurrency: int = Field(100, ge=1, le=100_000)

    # Worker threads for blocking work (decodes, upload reads, audit writes). anyio's default of 40 only
    # adds threads, stacks and malloc arenas on a small machine.
    threadpool_size: int = Field(16, ge=4, le=256)

    # glibc malloc arenas for the serving process (0: glibc's default of 8 per core). Each thread that
    # allocates gets its own arena and freed image buffers scatter across them, so resident memory
    # creeps up under load: measured 14% growth over a 60 s load test with the default, 1% with 2.
    malloc_arena_max: int = Field(2, ge=0, le=64)

    # Micro-batching (inference/batcher.py): send when full or when the oldest has waited the delay.
    # 4, not 8: on CPU a batch of 4 costs the same per image as 8 (measured 8.2 and 7.9 ms an image on the
    # shipped photo model), and a request waits for fewer images ahead of it: p99 at c=32 was 1.55x the
    # Little's-law mean against 1.93x with 8 (6 alternating rounds, 2 workers on 2 cores), throughput
    # within 2%. A GPU fills larger batches: raise it there (VERITY_BATCH_MAX_SIZE=16 or more).
    batch_max_size: int = Field(4, ge=1, le=256)
    # How long the oldest request waits for others to fill its batch. Unset: none on CPU, 4 ms on a GPU
    # (`ServedModel.batch_delay_ms`). On CPU the model's batches are what every core is busy with under
    # load, so requests queue while one runs and the next batch fills by itself; a wait only delays a
    # lone request (2 workers on 2 cores, 4 alternating rounds, 12 s each: at c=4 146-167 answers a
    # second with p99 37-43 ms waiting 4 ms, 177-190 with p99 32-37 ms not waiting; at c=32 193-210
    # against 210-216). Triton's dynamic batcher waits none by default either. A GPU's batch costs
    # little more for more images, so there a short wait for the decoders to feed it pays.
    batch_max_delay_ms: float | None = Field(None, ge=0.0, le=1000.0)  # a second at most: never a hang
    batch_max_queue: int = Field(128, ge=1)
    # Batches computed at once per model (Triton's instance count), each on one intra-op thread: one
    # per core keeps every core on the model under load. Unset: one per core on CPU (the box's cores
    # shared among `worker_processes`), one on a GPU.
    batch_workers: int | None = Field(None, ge=1, le=64)
    # Worker processes serving on this box (`verity serve --workers` sets it). Each runs its share of the
    # cores' batches: two processes each running a batch per core put two model runs on every core, and
    # the switches between them cost CPU (measured on 2 cores, 4 alternating rounds at c=32: 117 against
    # 112 answers a second, 16.6 against 17.5 ms of CPU an answer).
    worker_processes: int = Field(1, ge=1, le=64)
    # Whether those processes hand a new connection to the one holding the fewest (least connections,
    # api/connection_balance.py), and where they count them: `verity serve --workers N` makes a private
    # folder and sets it. Off: each keeps what the kernel gives it.
    balance_connections: bool = True
    connection_balance_dir: Path | None = None
    retry_after_s: int = Field(1, ge=1)

    # Tiling of large scans, by the one rule of inference/tiling.py that `verity predict` and `verity
    # eval` follow too: "auto" scores X-ray scans longer than 8 model inputs as overlapping tiles (the
    # highest decides) and every other image whole; "on" tiles any image larger than one tile; "off"
    # never tiles. The defaults are TilingOptions', so the three give an image the same score.
    tiling: Literal["auto", "on", "off"] = "auto"
    tile_scale: float = Field(0.5, gt=0.0, le=4.0)
    tile_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    max_tiles: int = Field(128, ge=1, le=4096)

    # Auth: station API keys, stored hashed. Required when set, and always when binding non-loopback.
    require_api_keys: bool = False
    keys_file: Path = Path("var/keys.json")

    # Audit log: a SQLite file (WAL; the embedded default, a path or sqlite:///PATH) or a PostgreSQL
    # database shared by every worker and box (postgresql://USER:PASSWORD@HOST:PORT/DATABASE, with the
    # `postgres` extra installed). Any other scheme stops start-up.
    audit_db: str = "var/audit.sqlite"
    # Keep each key's request rate in the audit store, so it holds across worker processes (and across
    # boxes sharing one PostgreSQL store); `verity serve --workers N` with N > 1 turns it on. Each charge
    # is then one short transaction.
    shared_limits: bool = False
    # Connections each server process keeps to a PostgreSQL audit database.
    audit_pool_size: int = Field(8, ge=1, le=256)
    # "normal" survives a killed process (WAL); "full" also survives power loss, at some cost per write.
    audit_synchronous: Literal["normal", "full"] = "normal"
    # Keep uploaded images, content-addressed, so confirmed cases can become training data.
    # A candidate model that answers live traffic beside the one serving, into the audit log only
    # (api/shadow.py): name/version or name@alias. None: no shadow.
    shadow: str | None = Field(None, max_length=129)
    store_images: bool = False
    image_store_dir: Path = Path("var/images")
    # Whether a right holder's key sees which station and case a seizure of its product came from (and
    # the officers' notes): an agency's decision, off unless it says so.
    rightholder_sees_stations: bool = False
    # Seizure alerts (api/alerts.py): each right holder's and the agency's webhook with its signing secret
    # (`verity alerts endpoint add`). Each attempt waits at most alert_timeout_s for the receiver; a failed
    # one is retried after a delay doubling from alert_retry_base_s up to alert_retry_max_s, until the
    # alert is alert_give_up_after_s old (then failed: `verity alerts retry` sends it again).
    alert_endpoints_file: Path = Path("var/alert_endpoints.json")
    alert_timeout_s: float = Field(5.0, gt=0.0, le=60.0)
    alert_retry_base_s: float = Field(2.0, gt=0.0, le=3600.0)
    alert_retry_max_s: float = Field(300.0, gt=0.0, le=86_400.0)
    alert_give_up_after_s: float = Field(86_400.0, gt=0.0, le=30 * 86_400.0)
    # The root (an ISO OID ending in ".") of the UIDs a DICOS threat report gets, and of those naming a
    # scan that came as PNG, TIFF or JPEG (a DICOM scan keeps its own): the organisation's, or pydicom's.
    uid_root: str = Field(DEFAULT_UID_ROOT, pattern=UID_ROOT_PATTERN, max_length=UID_ROOT_MAX)

    # Genuine reference images per model and product (inference/references/store.py): `verity refs` and
    # /v1/references enrol them here, and a request naming its product is checked against them.
    references_dir: Path = DEFAULT_REFERENCES_DIR
    # Share of genuine images of a product that its reference check may flag (leave-one-out calibration).
    reference_false_alarm_rate: float = Field(0.01, gt=0.0, lt=0.5)

    log_level: str = "info"
    log_json: bool = True

    # Exposure. Host names a request's Host header may carry ("*" any, "*.example.org" a domain's
    # names): loopback names by default, so a web page cannot reach a loopback server through DNS
    # rebinding; `verity serve --host` adds the bound address. A server behind a name needs that name.
    # VERITY_ALLOWED_HOSTS takes names separated by commas (or a JSON list).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(LOOPBACK_HOSTS))
    # Pages on other origins (scheme://host[:port], e.g. https://console.customs.example) trusted to send
    # state-changing requests (POST, PUT, PATCH, DELETE). Empty by default: only this server's own pages
    # (the console at /) and clients that send no Origin (curl, scanner consoles) may; a page anywhere
    # else gets 403, so a site the officer visits cannot post verdicts or feedback to a loopback server.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # /docs, /redoc and /openapi.json (served from local files, so they work on an air-gapped network).
    # Off: the three answer 404, for a deployment that publishes no description of its routes.
    api_docs: bool = True

    @field_validator("audit_db", mode="before")
    @classmethod
    def _path_or_url(cls, value: Any) -> Any:
        return str(value) if isinstance(value, os.PathLike) else value

    @field_validator("allowed_hosts", "allowed_origins", "modalities", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        """Each one Verity has, and at least one."""
        if not value or set(value) - set(MODALITIES):
            raise ValueError(f"expected some of {', '.join(MODALITIES)}, got {', '.join(value) or 'none'}")
        return value

    @field_validator("pinned_models", mode="before")
    @classmethod
    def _pins(cls, value: Any) -> Any:
        """`modality=name[/version]` pairs separated by commas, or a JSON object; a modality that Verity
        does not have, or a pair without `=`, is refused at start with what was expected."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                value = json.loads(text)
            else:
                pairs = [pair.strip() for pair in text.split(",") if pair.strip()]
                bad = [pair for pair in pairs if "=" not in pair]
                if bad:
                    raise ValueError(f"expected modality=name[/version] pairs, got {', '.join(bad)}")
                value = {key.strip(): pin.strip() for key, pin in (pair.split("=", 1) for pair in pairs)}
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(MODALITIES))
            if unknown:
                raise ValueError(f"unknown modality {', '.join(unknown)}: pin one of {', '.join(MODALITIES)}")
        return value

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_bytes=self.max_upload_bytes,
            max_pixels=self.max_pixels,
            max_decoded_bytes=self.max_decoded_bytes,
            max_jpeg_scans=self.max_jpeg_scans,
            max_image_segments=self.max_image_segments,
        )

    @property
    def tiling_options(self) -> TilingOptions:
        return TilingOptions(
            mode=self.tiling, scale=self.tile_scale, overlap=self.tile_overlap, max_tiles=self.max_tiles
        )


# Settings that were renamed: an old name left in a deployment's environment must not be silently ignored.
RENAMED_SETTINGS = {
    "VERITY_XRAY_TILING": "VERITY_TILING=auto|on|off (auto tiles large X-ray scans)",
    "VERITY_DATABASE_URL": "VERITY_AUDIT_DB=PATH, sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB",
}


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Builds Settings from the environment, the optional file (or $VERITY_CONFIG), then overrides."""
    for old, new in RENAMED_SETTINGS.items():
        if old in os.environ:
            raise ValueError(f"{old} is no longer read; use {new}.")
    config_file = config_file or os.environ.get("VERITY_CONFIG")
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"Settings file {config_file} does not exist.")
    return Settings(_env_file=config_file, **overrides)  # type: ignore[call-arg,arg-type]
