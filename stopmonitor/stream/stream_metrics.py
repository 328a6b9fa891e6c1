"""Prometheus metrics of stream mode (served by ``monitor_stops --stream --metrics-port``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("stopmonitor_stream_messages", "WebSocket messages received, by kind "
                   "(book_ticker, execution_report, server_shutdown, other)", ["kind"])
MESSAGE_RATE = Gauge("stopmonitor_stream_messages_per_second", "Market stream messages per second over the last watchdog tick")
LAG = Histogram("stopmonitor_stream_decision_lag_seconds",
                "Exchange event time (receipt time when the event has none, as bookTicker) to the decision on it",
                ["kind"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
RECONNECTS = Counter("stopmonitor_stream_reconnects", "Stream connections re-established, by connection kind and reason",
                     ["connection", "reason"])
FALLBACK = Gauge("stopmonitor_stream_symbols_in_fallback", "Watched symbols read by REST polling (stream silent or in hold-down)")
SUBSCRIBED = Gauge("stopmonitor_stream_symbols_subscribed", "Symbols with a bookTicker subscription")
CONNECTIONS = Gauge("stopmonitor_stream_connections", "Open market stream connections")
REST_PASSES = Counter("stopmonitor_stream_rest_passes", "REST reads of best bid/ask by the stream process, by why "
                      "(fallback, catch_up, start)", ["reason"])
DUPLICATE_REPORTS = Counter("stopmonitor_stream_duplicate_reports", "executionReport events already seen (same execution id)")
LAST_PROGRESS = Gauge("stopmonitor_stream_last_progress_timestamp_seconds",
                      "Unix time of the last stream message or completed REST pass of this process")
