"""OpenTelemetry for both services: tracing configured from the standard `OTEL_*` variables, and JSON log lines
that carry the current trace and span ids.

Tracing is off unless `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`); then `configure_from_env()`
hands every other variable (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
`OTEL_TRACES_SAMPLER`, ...) to the SDK's own configurator. Off means free: no provider, no interceptors, and
nothing of OpenTelemetry imported (it would be a tenth of the idle agent's memory and start-up).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grpc import aio
    from opentelemetry import trace

# The variables' names as opentelemetry.environment_variables and opentelemetry.sdk.environment_variables
# spell them, written out so that asking whether tracing is on imports nothing of OpenTelemetry.
OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"

# The span and resource attribute naming a workspace session.
SESSION_ATTRIBUTE = "workspace.session.id"

# The provider both services trace with; None while tracing is off.
_provider: trace.TracerProvider | None = None

# Health probes come in a loop while a workspace starts, and from monitors all along: not worth a span each.
_UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")


def tracing_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: OTEL_TRACES_EXPORTER set to something other than `none`."""
    exporters = environ.get(OTEL_TRACES_EXPORTER, "").strip().lower()
    disabled = environ.get(OTEL_SDK_DISABLED, "").strip().lower() == "true"
    return exporters not in ("", "none") and not disabled


def configure_from_env() -> bool:
    """Installs the global tracer provider from the `OTEL_*` variables when they ask for traces; returns whether
    tracing is now on. Raises RuntimeError for an unknown exporter or OTLP protocol (the SDK's message)."""
    if not tracing_requested():
        return False
    # The distro's configurator is the SDK's env handling (exporter entry points, protocol, sampler, resource);
    # it also registers an atexit flush of the batched spans.
    from opentelemetry import trace
    from opentelemetry.distro import OpenTelemetryConfigurator

    OpenTelemetryConfigurator().configure()
    set_tracer_provider(trace.get_tracer_provider())
    return True


def set_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Traces servers and clients created from now on with `provider`; None turns tracing off again.
    For processes that configure OpenTelemetry themselves (and for tests)."""
    global _provider
    _provider = provider


def tracer(name: str) -> trace.Tracer:
    """A tracer for domain spans (a no-op tracer while tracing is off)."""
    from opentelemetry import trace

    return _provider.get_tracer(name) if _provider is not None else trace.NoOpTracer()


@contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span]:
    """A span around a unit of work (an initialization phase) as a child of the current one; an exception
    escaping it is recorded on the span and marks it as failed."""
    with tracer("workspace-core").start_as_current_span(name, attributes=attributes) as current:
        yield current


def server_interceptors() -> list[aio.ServerInterceptor]:
    """The tracing interceptor for a grpc.aio server, to go FIRST so it sees auth refusals and mapped errors;
    [] while tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=_traced_calls())]


def client_interceptors() -> list[aio.ClientInterceptor]:
    """Interceptors for a grpc.aio channel that start client spans and send the trace context along;
    [] while tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors(tracer_provider=_provider, filter_=_traced_calls())


def _traced_calls() -> Callable[[Any], bool]:
    """The instrumentation's call filter: everything but _UNTRACED_SERVICES."""
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*(filters.service_prefix(s) for s in _UNTRACED_SERVICES)))


def trace_env() -> dict[str, str]:
    """The current span's context as `TRACEPARENT` (and `TRACESTATE`) for a child process; {} outside a span
    or while tracing is off."""
    if _provider is None:
        return {}
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {key.upper(): value for key, value in carrier.items() if key in ("traceparent", "tracestate")}


# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into the line.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the `extra=` fields, and trace_id/span_id when
    the record was logged inside a span."""

    converter = staticmethod(time.gmtime)  # the times say Z: keep them UTC

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if _provider is not None:  # else no span can be current
            from opentelemetry import trace

            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                line["trace_id"] = format(context.trace_id, "032x")
                line["span_id"] = format(context.span_id, "016x")
        line.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str | int = "INFO") -> None:
    """Sends the root logger's records to stderr as JSON lines at `level`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler], force=True)
