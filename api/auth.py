"""Station API keys: stored hashed in a JSON key file, re-read by the server whenever the file changes.

A key is `vk_<id>_<secret>`; only its SHA-256 is stored (keys are long random tokens, so a salted slow
hash would add nothing). `verity keys add|revoke|list` edits the file atomically (write, then rename),
so a running server never reads half a file and picks up changes without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from verity.inference.private_files import write_atomic
from verity.inference.references.errors import InvalidName
from verity.inference.references.names import validate_product
from verity.inference.stamps import FileStamp, file_stamp, utc_now

# A right holder's key (`verity keys add --rightholder ACME --products a,b`) speaks for a brand owner: it
# enrols genuine references of its products and reads their seizures, and reaches nothing else.
RIGHTHOLDER = "rightholder"
ROLES = ("station", "admin", RIGHTHOLDER)
# The role of a caller without a key (only where keys are not required), and the one rate bucket and
# decode share that all such callers have.
ANONYMOUS = "anonymous"
log = logging.getLogger("verity.api.auth")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    station_id: str
    role: str
    sha256: str
    created: str
    revoked: str | None = None
    products: tuple[str, ...] = ()  # a right holder's products; empty for every other role

    def __post_init__(self) -> None:
        object.__setattr__(self, "products", tuple(self.products))  # a list, as the key file holds it

    @property
    def active(self) -> bool:
        return self.revoked is None


def hash_key(secret_key: str) -> str:
    return hashlib.sha256(secret_key.encode("utf-8")).hexdigest()


class KeyStore:
    """The key file, cached in memory and re-read when its modification time or size changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._stamp: FileStamp | None = None
        self._keys: dict[str, ApiKey] = {}

    # Reading -----------------------------------------------------------------------------------
    def _refresh(self) -> dict[str, ApiKey]:
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return self._keys
        with self._lock:
            keys: dict[str, ApiKey] = {}
            if stamp is not None:
                try:
                    data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
                    keys = {entry["key_id"]: ApiKey(**entry) for entry in data.get("keys", [])}
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                    # A hand-edited, broken key file: keep the keys we had (and retry on the next
                    # change) rather than fail requests with a 500 or open the door.
                    log.error(
                        "key file unreadable; keeping the previous keys",
                        extra={"path": str(self.path), "error": str(error)},
                    )
                    self._stamp = stamp
                    return self._keys
            self._keys, self._stamp = keys, stamp
            return keys

    def list_keys(self) -> list[ApiKey]:
        return list(self._refresh().values())

    def active_count(self) -> int:
        return sum(1 for key in self.list_keys() if key.active)

    def verify(self, presented: str) -> ApiKey | None:
        """The active key matching `presented`, or None. Compares digests in constant time."""
        parts = presented.split("_")
        if len(parts) != 3 or parts[0] != "vk":
            return None
        key = self._refresh().get(parts[1])
        if key is None or not key.active:
            return None
        return key if hmac.compare_digest(key.sha256, hash_key(presented)) else None

    # Writing (the CLI) -------------------------------------------------------------------------
    def _write(self, keys: list[ApiKey]) -> None:
        text = json.dumps({"keys": [asdict(k) for k in keys]}, indent=2) + "\n"
        write_atomic(self.path, text.encode("utf-8"))  # owner only: the file holds the keys' hashes

    def add(
        self, station_id: str, role: str = "station", products: tuple[str, ...] = ()
    ) -> tuple[ApiKey, str]:
        """Creates a key; returns the record and the secret, which is shown once and never stored. A right
        holder's key names its products (at least one); no other key names any."""
        if role not in ROLES:
            raise ValueError(f"Invalid role {role!r}. Only {', '.join(ROLES)} are supported.")
        if (role == RIGHTHOLDER) != bool(products):
            raise ValueError("A right holder's key names its products (--products a,b); no other key does.")
        try:
            products = tuple(sorted({validate_product(product) for product in products}))
        except InvalidName as error:
            raise ValueError(str(error)) from error
        if not station_id or not station_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"Invalid station id {station_id!r}: use letters, digits, '-', '_' or '.'.")
        with self._lock:
            existing = self.list_keys()
            key_id = secrets.token_hex(4)
            while any(k.key_id == key_id for k in existing):
                key_id = secrets.token_hex(4)
            secret_key = f"vk_{key_id}_{secrets.token_urlsafe(32).replace('_', '-')}"
            record = ApiKey(
                key_id=key_id,
                station_id=station_id,
                role=role,
                sha256=hash_key(secret_key),
                created=utc_now("seconds"),
                products=products,
            )
            self._write([*existing, record])
        return record, secret_key

    def revoke(self, key_id: str) -> ApiKey:
        with self._lock:
            keys = self.list_keys()
            match = [k for k in keys if k.key_id == key_id]
            if not match:
                known = ", ".join(k.key_id for k in keys) or "none"
                raise ValueError(f"No key with id {key_id!r}. Known key ids: {known}.")
            revoked = ApiKey(**{**asdict(match[0]), "revoked": match[0].revoked or utc_now("seconds")})
            self._write([revoked if k.key_id == key_id else k for k in keys])
        return revoked
