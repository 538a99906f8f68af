"""Findings 7 and 8 of issue 23's security review: what the command line writes. Client text in a CSV
export must not run as a spreadsheet formula, nor escape sequences reach the terminal. The server's
findings are tests/test_security_findings.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_fixtures import make_settings
from fastapi.testclient import TestClient

from verity.api.app import create_app

# Finding 7: formula injection in `verity audit export --format csv` --------------------------------


def test_csv_export_neutralises_cells_that_start_like_a_formula(tmp_path: Path) -> None:
    import csv

    from verity.api.audit import AuditRecord, SQLiteAuditStore
    from verity.api.cli import audit_main

    db = tmp_path / "audit.sqlite"
    store = SQLiteAuditStore(db)
    hostile = {
        "r1": ("=HYPERLINK(\"http://evil.example\",\"open\")", "+gate"),
        "r2": ("-2+3", "@SUM(A1)"),
        "r3": ("\tTAB", "\rCR"),
        "r4": ("SEZ-2026-0412", "gate-3"),  # ordinary values stay as they are
    }
    store.record(
        [
            AuditRecord(
                request_id=request_id, created=f"2026-12-02T00:00:0{i}.000000+00:00", station_id=station,
                case_id=case, image_sha256="a" * 64, modality="photo", model_name="=cmd|' /C calc'!A0",
                model_version="1", score=0.25, verdict="genuine", alarm_threshold=0.6, clear_threshold=0.4,
                latency_ms=-1.5, reasons="classifier",
            )
            for i, (request_id, (case, station)) in enumerate(hostile.items())
        ]
    )
    store.close()
    out = tmp_path / "export.csv"
    assert audit_main(["export", "--db", str(db), "--format", "csv", "--out", str(out)]) == 0
    with out.open(newline="", encoding="utf-8") as handle:
        rows = {row["request_id"]: row for row in csv.DictReader(handle)}
    for request_id, (case, station) in hostile.items():
        row = rows[request_id]
        quoted = request_id != "r4"
        assert row["case_id"] == ("'" if quoted else "") + case
        assert row["station_id"] == ("'" if quoted else "") + station
        assert row["model_name"] == "'=cmd|' /C calc'!A0"
        assert row["latency_ms"] == "-1.5" and row["score"] == "0.25"  # numbers are numbers
    for row in rows.values():
        text = [value for name, value in row.items() if name != "latency_ms" and value]
        assert not any(value.startswith(("=", "+", "-", "@", "\t", "\r")) for value in text)


# Finding 8: terminal escape sequences in what the command line prints --------------------------------

# Retitles the terminal, clears the screen, then a C1 CSI and DEL: what an uploaded file name carried.
HOSTILE_NAME = "\x1b]0;pwned\x07\x1b[2J\x9b31m\x7fref.png"
RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\x7f")


def test_refs_list_escapes_uploaded_file_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_references_api import MODEL, noise_png, write_config, write_models

    from verity.api.auth import KeyStore
    from verity.api.refs_cli import refs_main

    write_models(tmp_path)
    settings = make_settings(tmp_path, references_dir=tmp_path / "references")
    _, secret = KeyStore(settings.keys_file).add("ops", role="admin")
    with TestClient(create_app(settings)) as client:
        enrolled = client.post(
            "/v1/references",
            files=[("files", (HOSTILE_NAME, noise_png(1), "image/png"))],
            data={"product": "acme", "modality": "photo"},
            headers={"X-API-Key": secret},
        )
        assert enrolled.status_code == 200, enrolled.text
    base = ["--model", str(tmp_path / "models" / MODEL), "--config", str(write_config(tmp_path))]
    for extra in ([], ["--json"]):
        assert refs_main(["list", *base, "--product", "acme", *extra]) == 0
        out = capsys.readouterr().out
        assert not any(control in out for control in RAW_CONTROLS), repr(out)
        assert "ref.png" in out and ("\\x1b]0;pwned" in out or "\\u001b]0;pwned" in out)


def test_audit_export_escapes_client_text_on_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case ids and station names are the clients' own text; printed to the terminal (the default
    output) they are escaped, written to a file they are kept."""
    from verity.api.audit import AuditRecord, SQLiteAuditStore
    from verity.api.cli import audit_main

    db = tmp_path / "audit.sqlite"
    store = SQLiteAuditStore(db)
    store.record(
        [
            AuditRecord(
                request_id="r1", created="2026-12-02T00:00:00.000000+00:00", station_id="\x9bgate",
                case_id="SEZ\x1b[2J\x7f", image_sha256="a" * 64, modality="photo", model_name="m",
                model_version="1", score=0.25, verdict="genuine", alarm_threshold=0.6, clear_threshold=0.4,
                latency_ms=1.0,
            )
        ]
    )
    store.close()
    for output_format in ("csv", "jsonl"):
        assert audit_main(["export", "--db", str(db), "--format", output_format]) == 0
        out = capsys.readouterr().out
        assert not any(control in out for control in RAW_CONTROLS), repr(out)
        assert "SEZ" in out
    on_file = tmp_path / "export.jsonl"
    assert audit_main(["export", "--db", str(db), "--out", str(on_file)]) == 0
    assert json.loads(on_file.read_text())["case_id"] == "SEZ\x1b[2J\x7f"  # a file keeps the value exactly


def test_terminal_safe_escapes_every_control_character() -> None:
    from verity.inference.terminal import terminal_json, terminal_lines, terminal_safe

    hostile = "a\x00b\x1b[31m\x7f\x85\x9b\u202etxt.exe"
    assert terminal_safe(hostile) == "a\\x00b\\x1b[31m\\x7f\\x85\\x9b\\u202etxt.exe"
    assert terminal_safe("Zürich gate 3 — ok") == "Zürich gate 3 — ok"
    assert terminal_lines("one\x1b\ntwo\r") == "one\\x1b\ntwo\\x0d"
    assert json.loads(terminal_json({"a": "\x7f\x1b"})) == {"a": "\x7f\x1b"}
    assert "\x7f" not in terminal_json("\x7f")
