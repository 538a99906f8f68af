"""/v1/predict's answer as a DICOS Threat Detection Report (`format=dicos` or `Accept: application/dicom`),
written by inference.dicos_report from the audit record the answer already has."""

from __future__ import annotations

import time
from datetime import datetime

from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from verity.api.audit import AuditRecord
from verity.api.registry import ServedModel
from verity.api.routes.predict_input import DICOM_MEDIA_TYPE
from verity.inference.dicos_report import ReportFacts, report_for
from verity.inference.pipeline import Scored


async def report_response(
    record: AuditRecord, scored: Scored, served: ServedModel, data: bytes, uid_root: str, started: float
) -> Response:
    """The answer as a DICOS Threat Detection Report (inference.dicos_report), the verdict also in headers
    for a client that logs it without reading DICOM."""
    facts = ReportFacts(
        report_uid=str(record.report_uid), verdict=record.verdict, score=record.score,
        model=record.model_name, version=record.model_version, alarm=record.alarm_threshold,
        clear=record.clear_threshold, decided=datetime.fromisoformat(record.created),
        processing_ms=(time.perf_counter() - started) * 1000.0, uid_root=uid_root,
    )  # fmt: skip
    ooi_id = record.case_id or record.request_id
    content = await run_in_threadpool(report_for, data, scored, served.engine.spec, facts, ooi_id)
    headers = {
        "Content-Disposition": f'attachment; filename="{record.request_id}.dcm"',
        "X-Verity-Verdict": record.verdict,
        "X-Verity-Score": f"{record.score:.6f}",
        "X-Verity-Report-UID": str(record.report_uid),
    }
    return Response(content, media_type=DICOM_MEDIA_TYPE, headers=headers)
