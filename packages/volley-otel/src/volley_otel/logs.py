"""Log correlation: every log record written while a span is current carries its trace and span ids.

The attribute names are those of OpenTelemetry's logging instrumentation (``otelTraceID``, ``otelSpanID``,
``otelTraceSampled``), so a format such as ``%(otelTraceID)s`` or a JSON formatter picking them up works the same.
Volley makes a message's "process" span current while its handler runs, so the handler's own log records (and
those of the libraries it calls) carry the ids of the message they are about.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from opentelemetry import trace

INVALID_TRACE_ID = "0"
INVALID_SPAN_ID = "0"

_lock = threading.Lock()
_installed = False


def install_log_correlation() -> None:
    """Wrap the logging record factory (once per process) to add the current span's ids to each record."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()
        get_current_span = trace.get_current_span

        def record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            context = get_current_span().get_span_context()
            if context.is_valid:
                record.otelTraceID = format(context.trace_id, "032x")
                record.otelSpanID = format(context.span_id, "016x")
                record.otelTraceSampled = context.trace_flags.sampled
            else:
                record.otelTraceID = INVALID_TRACE_ID
                record.otelSpanID = INVALID_SPAN_ID
                record.otelTraceSampled = False
            return record

        logging.setLogRecordFactory(record_factory)
        _installed = True
