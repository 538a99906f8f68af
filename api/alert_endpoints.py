"""Where seizure alerts go: each right holder's webhook and the agency's, with the secret that signs them.

    verity alerts endpoint add --rightholder ACME --url https://alerts.acme.example/verity [--on-alarm]
    verity alerts endpoint add --agency --url https://ops.customs.example/verity
    verity alerts endpoint list | remove NAME

The file (VERITY_ALERT_ENDPOINTS_FILE, owner-only) holds each endpoint's URL and signing secret: the
server must know the secret to sign, so unlike an API key it is stored as it is, and shown once when
made. A right holder's endpoint carries its name as on its keys (`verity keys add --rightholder ACME`);
its products are those of its active keys, so one list says what a holder owns. Edited atomically and
re-read by a running server when it changes, like the key file.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from verity.api.settings import is_loopback
from verity.inference.private_files import write_atomic
from verity.inference.stamps import FileStamp, file_stamp, utc_now

# The agency's endpoint has this name; a right holder's has the holder's.
AGENCY = "agency"
URL_MAX = 2048
log = logging.getLogger("verity.api.alerts")


@dataclass(frozen=True)
class AlertEndpoint:
    name: str  # the right holder's name, or AGENCY
    url: str
    secret: str  # signs every alert (HMAC-SHA256); the receiver holds the same
    on_alarm: bool  # also every counterfeit verdict naming its products, not only confirmed seizures
    created: str

    @property
    def is_agency(self) -> bool:
        return self.name == AGENCY


def check_url(url: str, allow_http: bool = False) -> str:
    """An https URL (http only to a loopback host, or when the operator says so with --allow-http: a
    seizure alert names a product and a case, and must not cross a network in clear by accident)."""
    if len(url) > URL_MAX or not url.isprintable():
        raise ValueError(f"The alert URL must be printable and at most {URL_MAX} characters.")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"The alert URL must be https://HOST/PATH (got {url!r}).")
    if parts.username or parts.password:
        raise ValueError("The alert URL must not carry a user or password: alerts are signed instead.")
    if parts.scheme == "http" and not (allow_http or is_loopback(parts.hostname)):
        raise ValueError(
            f"{url!r} is plain http to another host: use https, or --allow-http on a network you trust."
        )
    return url


def _check_name(name: str) -> str:
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"Invalid right holder name {name!r}: use letters, digits, '-', '_' or '.'.")
    return name


class EndpointStore:
    """The endpoints file, cached in memory and re-read when it changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._stamp: FileStamp | None = None
        self._endpoints: dict[str, AlertEndpoint] = {}

    def endpoints(self) -> dict[str, AlertEndpoint]:
        """name -> endpoint; an unreadable file keeps the previous endpoints (and is logged)."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return self._endpoints
        with self._lock:
            found: dict[str, AlertEndpoint] = {}
            if stamp is not None:
                try:
                    data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
                    found = {entry["name"]: AlertEndpoint(**entry) for entry in data.get("endpoints", [])}
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                    log.error("alert endpoints file unreadable; keeping the previous endpoints",
                              extra={"path": str(self.path), "error": str(error)})  # fmt: skip
                    self._stamp = stamp
                    return self._endpoints
            self._endpoints, self._stamp = found, stamp
            return found

    def get(self, name: str) -> AlertEndpoint | None:
        return self.endpoints().get(name)

    def _write(self, endpoints: list[AlertEndpoint]) -> None:
        text = json.dumps({"endpoints": [asdict(e) for e in endpoints]}, indent=2) + "\n"
        write_atomic(self.path, text.encode("utf-8"))  # owner only: it holds the signing secrets

    def add(self, name: str, url: str, on_alarm: bool = False, allow_http: bool = False) -> AlertEndpoint:
        """Adds or replaces the endpoint of `name` with a new secret (a replaced one's secret stops
        verifying: the receiver needs the new one)."""
        endpoint = AlertEndpoint(
            name=_check_name(name),
            url=check_url(url, allow_http),
            secret="whsec_" + secrets.token_urlsafe(32),
            on_alarm=on_alarm,
            created=utc_now("seconds"),
        )
        with self._lock:
            others = [e for e in self.endpoints().values() if e.name != name]
            self._write([*others, endpoint])
        return endpoint

    def remove(self, name: str) -> AlertEndpoint:
        with self._lock:
            current = self.endpoints()
            if name not in current:
                known = ", ".join(sorted(current)) or "none"
                raise ValueError(f"No alert endpoint named {name!r}. Known: {known}.")
            self._write([e for e in current.values() if e.name != name])
        return current[name]
