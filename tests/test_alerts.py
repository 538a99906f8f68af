"""Seizure alerts (issue 28 scope 4): signed webhooks to the product's right holders and the agency,
written with the confirmation, sent by a dispatcher with retries, and managed by `verity alerts`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alert_receiver import AlertReceiver
from api_fixtures import BRIGHT, DARK, LiveServer, admin_headers, predict, server_env
from fastapi.testclient import TestClient

from tests.test_references_api import MODEL, enrol, write_models
from tests.test_rightholder import OTHER, OWN, _setup
from verity import cli as verity_cli
from verity.api.alert_delivery import AlertDispatcher, DeliveryOptions
from verity.api.alert_endpoints import AGENCY, EndpointStore
from verity.api.alerts import retry_delay, signature, verify
from verity.api.app import create_app
from verity.api.audit import FeedbackRecord, open_audit_store
from verity.api.auth import KeyStore
from verity.api.settings import Settings


def wait_for(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------- signing
def test_a_signature_verifies_only_with_its_secret_its_body_and_a_recent_time() -> None:
    body, now = b'{"id":"a1","event":"seizure.confirmed"}', 1_800_000_000.0
    headers = {"Verity-Timestamp": str(int(now)), "Verity-Signature": signature("whsec_s", int(now), body)}
    assert verify("whsec_s", body, headers, now + 10)
    assert verify("whsec_s", body, {k.lower(): v for k, v in headers.items()}, now)  # header case
    assert not verify("whsec_other", body, headers, now)
    assert not verify("whsec_s", body.replace(b"a1", b"a2"), headers, now)  # a changed body
    assert not verify("whsec_s", body, headers, now + 301)  # replayed six minutes later
    assert not verify("whsec_s", body, {"Verity-Signature": headers["Verity-Signature"]}, now)
    # The timestamp is signed too: moving it forward to pass the replay check breaks the signature.
    moved = {**headers, "Verity-Timestamp": str(int(now) + 600)}
    assert not verify("whsec_s", body, moved, now + 600)


def test_retries_double_up_to_the_cap() -> None:
    delays = [retry_delay(attempt, 2.0, 60.0) for attempt in range(1, 9)]
    for attempt, delay in enumerate(delays, start=1):
        assert 0.8 * min(60.0, 2.0 * 2 ** (attempt - 1)) <= delay <= min(60.0, 2.0 * 2 ** (attempt - 1))


def test_an_endpoint_is_https_or_loopback_and_its_secret_is_kept_private(tmp_path: Path) -> None:
    store = EndpointStore(tmp_path / "endpoints.json")
    for url in ("http://alerts.acme.example/x", "ftp://acme.example/x", "https://user:pw@acme.example/x",
                "https:///nohost", "https://acme.example/\x00"):  # fmt: skip
        with pytest.raises(ValueError):
            store.add("acme", url)
    assert store.add("acme", "http://alerts.acme.example/x", allow_http=True).url.startswith("http://")
    first = store.add("acme", "https://alerts.acme.example/verity")
    assert store.add("rival", "http://127.0.0.1:9/x").name == "rival"
    assert set(store.endpoints()) == {"acme", "rival"} and store.get("acme") == first
    assert first.secret.startswith("whsec_") and len(first.secret) > 40
    assert (tmp_path / "endpoints.json").stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="Known: acme, rival"):
        store.remove("nobody")


# ------------------------------------------------------------------------------- the loop, in-process
def _endpoints(
    config: Settings, receivers: dict[str, AlertReceiver], on_alarm: bool = False
) -> dict[str, str]:
    """Each receiver as the endpoint of its name; the secrets."""
    store = EndpointStore(config.alert_endpoints_file)
    return {name: store.add(name, r.url, on_alarm=on_alarm).secret for name, r in receivers.items()}


def _confirm(client: TestClient, headers: dict[str, str], request_id: str, label: str = "counterfeit") -> Any:
    answer = client.post("/v1/feedback", json={"request_id": request_id, "confirmed_label": label},
                         headers=headers)  # fmt: skip
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_confirmed_counterfeit_alerts_its_right_holder_and_the_agency_once(tmp_path: Path) -> None:
    config, keys = _setup(tmp_path)
    receivers = {name: AlertReceiver().start() for name in ("acme", "rival", AGENCY)}
    secrets = _endpoints(config, receivers)
    try:
        with TestClient(create_app(config)) as client:
            for product, seeds in ((OWN, [1, 2, 3, 4, 5]), (OTHER, [11, 12, 13, 14, 15])):
                assert enrol(client, keys["admin"], seeds, product=product).status_code == 200
            ids = {}
            for product, case in ((OWN, "SEZ-1"), (OTHER, "SEZ-2")):
                answer = predict(client, BRIGHT, headers=keys["station"], product=product, case_id=case)
                ids[product] = answer.json()["request_id"]
                assert _confirm(client, keys["station"], ids[product])["alerts"] == 2  # holder and agency
            genuine = predict(client, DARK, headers=keys["station"], product=OWN).json()["request_id"]
            assert _confirm(client, keys["station"], genuine, "genuine")["alerts"] == 0
            _confirm(client, keys["admin"], ids[OWN])  # confirmed again: the same alert ids, none new
            wait_for(lambda: len(receivers[AGENCY].received) == 2 and len(receivers["acme"].received) == 1
                     and len(receivers["rival"].received) == 1)  # fmt: skip
            time.sleep(1.5)  # a second round of the dispatcher sends nothing more
            metrics = client.get("/metrics", headers=keys["admin"]).text
            assert 'verity_alert_attempts_total{endpoint="acme",outcome="delivered"} 1.0' in metrics
            assert 'verity_alert_attempts_total{endpoint="agency",outcome="delivered"} 2.0' in metrics
    finally:
        for receiver in receivers.values():
            receiver.stop()
    now = time.time()
    for name, receiver in receivers.items():
        assert receiver.all_verify(secrets[name], now), name
        assert not receiver.all_verify(secrets["rival" if name == "acme" else "acme"], now)
    (acme,) = [item.json() for item in receivers["acme"].received]
    assert acme["event"] == "seizure.confirmed" and acme["product"] == OWN
    assert acme["request_id"] == ids[OWN] and acme["confirmation"]["label"] == "counterfeit"
    assert acme["station_id"] is None and acme["case_id"] is None  # the agency has not let holders see them
    assert [item.json()["product"] for item in receivers["rival"].received] == [OTHER]
    agency = {item.json()["product"]: item.json() for item in receivers[AGENCY].received}
    assert set(agency) == {OWN, OTHER} and agency[OWN]["station_id"] == "gate-1"
    assert agency[OWN]["case_id"] == "SEZ-1" and agency[OWN]["id"] != acme["id"]


def test_an_endpoint_that_asked_for_alarms_gets_each_counterfeit_verdict(tmp_path: Path) -> None:
    config, keys = _setup(tmp_path)
    receiver = AlertReceiver().start()
    secret = _endpoints(config, {"acme": receiver}, on_alarm=True)["acme"]
    try:
        with TestClient(create_app(config)) as client:
            assert enrol(client, keys["admin"], [1, 2, 3, 4, 5], product=OWN).status_code == 200
            alarm = predict(client, BRIGHT, headers=keys["station"], product=OWN).json()
            assert alarm["verdict"] == "counterfeit"
            clear = predict(client, DARK, headers=keys["station"]).json()  # no product, and genuine
            assert clear["verdict"] != "counterfeit"
            wait_for(lambda: len(receiver.received) == 1)
            _confirm(client, keys["station"], alarm["request_id"])
            wait_for(lambda: len(receiver.received) == 2)
    finally:
        receiver.stop()
    events = [(item.json()["event"], item.json()["request_id"]) for item in receiver.received]
    assert events == [("alarm", alarm["request_id"]), ("seizure.confirmed", alarm["request_id"])]
    assert receiver.all_verify(secret, time.time())


# ------------------------------------------------------------------------------------ the dispatcher
def _outbox_with_alerts(tmp_path: Path, receiver: AlertReceiver, count: int) -> tuple[Any, EndpointStore]:
    """An audit store holding `count` confirmed counterfeits of OWN, each with its alert to acme."""
    from tests.test_audit import record
    from verity.api.alerts import AlertPlanner

    keys = KeyStore(tmp_path / "keys.json")
    keys.add("acme", role="rightholder", products=(OWN,))
    endpoints = EndpointStore(tmp_path / "endpoints.json")
    endpoints.add("acme", receiver.url)
    store = open_audit_store(Settings(audit_db=tmp_path / "audit.sqlite"))
    planner = AlertPlanner(endpoints, keys, holders_see_stations=False)
    for i in range(count):
        verdict = record(f"r-{i}", product=OWN, verdict="counterfeit")
        store.record([verdict])
        confirmation = FeedbackRecord(f"r-{i}", verdict.created, "counterfeit", role="station")
        store.add_feedback(confirmation, planner.for_confirmation(verdict, confirmation))
    return store, endpoints


def test_a_failed_attempt_waits_then_gives_up_and_retry_sends_it_again(tmp_path: Path) -> None:
    receiver = AlertReceiver(status=503).start()
    store, endpoints = _outbox_with_alerts(tmp_path, receiver, 1)
    try:
        options = DeliveryOptions(retry_base_s=30.0, give_up_after_s=60.0)
        dispatcher = AlertDispatcher(store, endpoints, options)
        now = time.time()
        assert dispatcher.deliver_due(now) == 1
        (alert,) = store.alerts()
        assert alert.status == "pending" and alert.attempts == 1 and alert.last_error == "HTTP 503"
        assert now + 23 < alert.next_attempt <= now + 31  # the first delay, less its jitter
        assert dispatcher.deliver_due(now + 1) == 0  # not due yet
        assert dispatcher.deliver_due(alert.next_attempt + 61) == 1  # due, and past the give-up age
        (alert,) = store.alerts()
        assert alert.status == "failed" and alert.attempts == 2
        assert dispatcher.deliver_due(alert.next_attempt + 1000) == 0  # failed: never sent again by itself
        receiver.status = 200
        assert store.retry_alerts(None, time.time()) == 1
        assert dispatcher.deliver_due(time.time()) == 1
        (alert,) = store.alerts()
        assert alert.status == "delivered" and alert.delivered is not None and alert.last_error is None
        log = store.alert_deliveries(alert.alert_id)
        assert [(d.attempt, d.status_code) for d in log] == [(1, 503), (2, 503), (1, 200)]
        assert len(receiver.received) == 3 and len(set(receiver.ids())) == 1
    finally:
        store.close()
        receiver.stop()


def test_two_dispatchers_never_send_one_alert_twice(tmp_path: Path) -> None:
    receiver = AlertReceiver().start()
    store, endpoints = _outbox_with_alerts(tmp_path, receiver, 12)
    other = open_audit_store(Settings(audit_db=tmp_path / "audit.sqlite"))  # another worker's connection
    try:
        first = AlertDispatcher(store, endpoints, DeliveryOptions())
        second = AlertDispatcher(other, endpoints, DeliveryOptions())
        first.start(), second.start()
        wait_for(lambda: len(receiver.received) >= 12)
        time.sleep(1.5)
        first.stop(), second.stop()
        assert sorted(receiver.ids()) == sorted({a.alert_id for a in store.alerts()})  # each exactly once
        assert {a.status for a in store.alerts()} == {"delivered"}
    finally:
        store.close()
        other.close()
        receiver.stop()


def test_an_unreachable_receiver_is_logged_and_a_removed_endpoint_fails_the_attempt(tmp_path: Path) -> None:
    receiver = AlertReceiver()  # never started: connections are refused
    store, endpoints = _outbox_with_alerts(tmp_path, receiver, 2)
    try:
        dispatcher = AlertDispatcher(store, endpoints, DeliveryOptions())
        assert dispatcher.deliver_due(time.time()) == 2
        first, second = store.alerts()
        assert first.status == "pending" and "ConnectionRefusedError" in (first.last_error or "")
        endpoints.remove("acme")
        store.retry_alerts([first.alert_id], time.time())
        dispatcher.attempt(store.claim_alerts(time.time(), 60, 1)[0], time.time())
        assert "no alert endpoint named 'acme'" in (store.alert(first.alert_id).last_error or "")
        (logged,) = [d for d in store.alert_deliveries(second.alert_id)]
        assert logged.status_code is None and logged.duration_ms >= 0
    finally:
        store.close()


# -------------------------------------------------------------------------------------------- the CLI
def test_the_cli_adds_endpoints_lists_shows_and_retries_alerts(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = AlertReceiver(status=500).start()
    store, endpoints = _outbox_with_alerts(tmp_path, receiver, 1)
    monkeypatch.setenv("VERITY_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    monkeypatch.setenv("VERITY_ALERT_ENDPOINTS_FILE", str(tmp_path / "endpoints.json"))
    try:
        assert verity_cli.main(["alerts", "endpoint", "add", "--agency", "--url", receiver.url]) == 0
        secret = capsys.readouterr().out.strip()
        assert secret.startswith("whsec_") and EndpointStore(tmp_path / "endpoints.json").get(AGENCY)
        assert verity_cli.main(["alerts", "endpoint", "list"]) == 0
        listed = capsys.readouterr().out
        assert "acme" in listed and AGENCY in listed and "whsec_" not in listed
        for wrong in (["endpoint", "add", "--rightholder", "x", "--url", "http://acme.example/x"],
                      ["endpoint", "add", "--rightholder", AGENCY, "--url", receiver.url],
                      ["retry"], ["retry", "a", "--failed"], ["list", "--limit", "0"]):  # fmt: skip
            with pytest.raises(SystemExit) as stopped:
                verity_cli.main(["alerts", *wrong])
            assert stopped.value.code == 2
        AlertDispatcher(store, endpoints, DeliveryOptions(give_up_after_s=0.001)).deliver_due(time.time() + 1)
        capsys.readouterr()
        assert verity_cli.main(["alerts", "list", "--status", "failed"]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        alert_id = line.split()[0]
        assert "seizure.confirmed" in line and "failed" in line and "HTTP 500" in line
        assert verity_cli.main(["alerts", "show", alert_id]) == 0
        shown = capsys.readouterr().out
        assert '"product":"velmor-tea"' in shown and "attempt 1" in shown and "HTTP 500" in shown
        assert verity_cli.main(["alerts", "show", "nope"]) == 1
        assert verity_cli.main(["alerts", "retry", "--failed"]) == 0
        assert "1 alert(s)" in capsys.readouterr().out
        assert verity_cli.main(["alerts", "list", "--json"]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert row["status"] == "pending" and row["attempts"] == 0
        assert verity_cli.main(["alerts", "endpoint", "remove", AGENCY]) == 0
    finally:
        store.close()
        receiver.stop()


# ------------------------------------------------------------------------------- a real server, down
@pytest.mark.slow
def test_a_receiver_down_for_30_s_gets_every_alert_once_across_a_server_restart(tmp_path: Path) -> None:
    """Alerts raised while the right holder's receiver is down stay in the outbox through a restart of
    the server, and each arrives once, signed, when the receiver comes back after 30 s."""
    env = server_env(tmp_path, VERITY_REQUIRE_API_KEYS="true", VERITY_RATE_LIMIT_PER_S="0",
                     VERITY_REFERENCES_DIR=str(tmp_path / "references"),
                     VERITY_ALERT_ENDPOINTS_FILE=str(tmp_path / "endpoints.json"),
                     VERITY_ALERT_RETRY_BASE_S="1", VERITY_ALERT_RETRY_MAX_S="4")  # fmt: skip
    env["VERITY_PINNED_MODELS"] = f"photo={MODEL}"  # the tiny model with an embedding (write_models)
    write_models(tmp_path)  # beside server_env's models, in the same folder
    keys = KeyStore(tmp_path / "keys.json")
    station = {"X-API-Key": keys.add("gate-1")[1]}
    keys.add("acme", role="rightholder", products=(OWN,))
    receiver = AlertReceiver()  # down: nothing listens on its port yet
    secret = EndpointStore(tmp_path / "endpoints.json").add("acme", receiver.url).secret
    admin = admin_headers(Settings(keys_file=tmp_path / "keys.json"))
    server = LiveServer(env).start()
    went_down = time.monotonic()
    try:
        import httpx

        with httpx.Client(base_url=server.url, timeout=30) as client:
            files = [("files", ("ref-1.png", DARK, "image/png"))]  # enrolled: the product check runs
            enrolled = client.post("/v1/references", files=files, data={"product": OWN, "modality": "photo"},
                                   headers=admin)  # fmt: skip
            assert enrolled.status_code == 200, enrolled.text
            raised = [_live_seizure(client, station) for _ in range(3)]
        server.stop()  # SIGTERM, with alerts still pending
        server = LiveServer(env).start()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            raised += [_live_seizure(client, station) for _ in range(2)]
        time.sleep(max(0.0, 30.0 - (time.monotonic() - went_down)))
        receiver.start()
        wait_for(lambda: len(receiver.received) >= 5, timeout_s=30)
        time.sleep(6)  # longer than the longest retry delay: nothing more arrives
    finally:
        server.stop()
        receiver.stop()
    assert sorted(item.json()["request_id"] for item in receiver.received) == sorted(raised)
    assert len(set(receiver.ids())) == len(receiver.received) == 5
    assert receiver.all_verify(secret, time.time())


def _live_seizure(client: Any, station: dict[str, str]) -> str:
    files = {"file": ("item.png", BRIGHT, "image/png")}
    form = {"modality": "photo", "product": OWN}
    answer = client.post("/v1/predict", files=files, data=form, headers=station)
    assert answer.status_code == 200, answer.text
    request_id = answer.json()["request_id"]
    confirmed = client.post("/v1/feedback", json={"request_id": request_id, "confirmed_label": "counterfeit"},
                            headers=station)  # fmt: skip
    assert confirmed.status_code == 200 and confirmed.json()["alerts"] == 1, confirmed.text
    return request_id
