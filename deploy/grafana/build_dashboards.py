"""Loyalist's Grafana dashboards as code: ``python deploy/grafana/build_dashboards.py`` writes
``deploy/grafana/dashboards/*.json`` (committed; a test checks they match this file).

Every query reads only series the services export (checked against the ``metrics.py`` declarations) and
returns data on a live stack (``tests/ops/test_dashboards_live.py`` evaluates each one): no "No data" panels.
Queries use Grafana's ``$__rate_interval`` and select the datasource through the ``datasource`` variable,
so the same JSON works in docker-compose and with the Helm chart's sidecar.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
OPS_ROUTES = 'route!~"/healthz|/readyz|/metrics"'
RATE = "$__rate_interval"
NOT_5XX = '"5.."'


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    description: str
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def q(percentile: float, metric: str, by: str = "", where: str = "") -> str:
    """A histogram quantile over the rate window, optionally grouped."""
    group = f"le, {by}" if by else "le"
    selector = f"{{{where}}}" if where else ""
    return f"histogram_quantile({percentile}, sum by ({group}) (rate({metric}_bucket{selector}[{RATE}])))"


def rate(metric: str, by: str = "", where: str = "") -> str:
    selector = f"{{{where}}}" if where else ""
    grouping = f"sum by ({by}) " if by else "sum "
    return f"{grouping}(rate({metric}{selector}[{RATE}]))"


def render_panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    options: dict[str, Any]
    if panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "area", "textMode": "auto", "orientation": "auto"}
    else:
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if panel.stack else 0,
                              "showPoints": "never", "spanNulls": True,
                              "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"}}
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
    defaults.update(panel.extra)
    return {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend, "range": True}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def dashboard(uid: str, title: str, description: str, panels: list[Panel]) -> dict[str, Any]:
    rendered, x, y, row_height = [], 0, 0, 0
    for pid, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        rendered.append(render_panel(panel, pid, x, y))
        x += panel.width
        row_height = max(row_height, panel.height)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["loyalist"],
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "utc",
        "annotations": {"list": []},
        "links": [{"title": "Loyalist", "type": "dashboards", "tags": ["loyalist"], "asDropdown": True}],
        "templating": {"list": [{
            "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0, "refresh": 1,
        }]},
        "panels": rendered,
    }


def overview() -> dict[str, Any]:
    return dashboard("loyalist-overview", "Loyalist / Overview", "Events in, lag, errors, end-to-end freshness.", [
        Panel("Events accepted", [(rate("loyalist_ingest_events_accepted_total"), "events/s")],
              "Events acknowledged by Kafka and answered 2xx by ingest.", "ops", "stat", 6, 5),
        Panel("Consumer lag (all groups)", [("sum(loyalist_kafka_consumer_lag_messages)", "messages")],
              "Messages not yet processed, summed over every consumer group (lag exporter).", "short", "stat", 6, 5),
        Panel("Profile freshness p99", [(q(0.99, "loyalist_profile_freshness_seconds"), "p99")],
              "From ingest acceptance to the profile update (SLO: 99% within 5 s).", "s", "stat", 6, 5),
        Panel("Targets up", [('sum(up{job=~"loyalist|loyalist-lag"})', "up")],
              "Scrape targets answering: the five services and the lag exporter.", "short", "stat", 6, 5),
        Panel("Events accepted by source", [(rate("loyalist_ingest_events_accepted_total", "source"), "{{source}}")],
              "Ingest throughput per source (web, server, webhooks, imports, feedback).", "ops", stack=True),
        Panel("Consumer lag by group", [("sum by (group) (loyalist_kafka_consumer_lag_messages)", "{{group}}")],
              "Backlog per consumer group; growing lag means the workers cannot keep up.", "short"),
        Panel("API requests by service", [(rate("loyalist_http_requests_total", "service", OPS_ROUTES),
                                           "{{service}}")],
              "Requests per second, health and metrics endpoints excluded.", "reqps", stack=True),
        Panel("API server-error ratio by service", [(
            f"1 - ({rate('loyalist_http_requests_total', 'service', OPS_ROUTES + ', status!~' + NOT_5XX)}"
            f" / {rate('loyalist_http_requests_total', 'service', OPS_ROUTES)})", "{{service}}")],
            "Share of requests answered 5xx (alert above 5%).", "percentunit"),
        Panel("End-to-end freshness", [(q(0.5, "loyalist_profile_freshness_seconds"), "p50"),
                                       (q(0.99, "loyalist_profile_freshness_seconds"), "p99")],
              "Time from ingest acceptance to the profile being updated.", "s"),
        Panel("Messages sent by channel", [(rate("loyalist_notify_sent_total", "channel"), "{{channel}}")],
              "Messages accepted by the email/SMS/webhook providers.", "ops", stack=True),
    ])


def ingest() -> dict[str, Any]:
    where = f'service="ingest", {OPS_ROUTES}'
    return dashboard("loyalist-ingest", "Loyalist / Ingest", "Tracking API, webhooks and the Kafka write path.", [
        Panel("Accepted events by type", [(rate("loyalist_ingest_events_accepted_total", "type"), "{{type}}")],
              "Events acknowledged by Kafka, by call type (track, identify, page, ...).", "ops", stack=True),
        Panel("Rejected messages by reason", [(rate("loyalist_ingest_events_rejected_total", "reason"), "{{reason}}")],
              "Messages or requests refused with a 4xx, by reason code.", "ops", stack=True),
        Panel("Requests by route and status", [(rate("loyalist_http_requests_total", "route, status", where),
                                                "{{route}} {{status}}")],
              "Ingest API traffic.", "reqps"),
        Panel("Request latency p99 by route", [(q(0.99, "loyalist_http_request_duration_seconds", "route", where),
                                                "{{route}}")],
              "Includes waiting for Kafka's acknowledgement (acks=all) before answering.", "s"),
        Panel("Kafka produce latency", [
            (q(0.5, "loyalist_kafka_produce_duration_seconds", where='service="ingest"'), "p50"),
            (q(0.99, "loyalist_kafka_produce_duration_seconds", where='service="ingest"'), "p99")],
              "Time until all in-sync replicas acknowledged a produce.", "s"),
        Panel("Batch size", [(q(0.5, "loyalist_ingest_batch_size_messages"), "p50"),
                             (q(0.95, "loyalist_ingest_batch_size_messages"), "p95")],
              "Messages per /v1/batch request.", "short"),
        Panel("Duplicates acknowledged", [(rate("loyalist_ingest_dedup_hits_total", "source"), "{{source}}")],
              "Resent messageIds acknowledged without producing again (SDK retries).", "ops"),
        Panel("Requests in flight", [('sum(loyalist_http_requests_in_flight{service="ingest"})', "in flight")],
              "Concurrent requests being handled.", "short"),
    ])


def streams() -> dict[str, Any]:
    return dashboard("loyalist-streams", "Loyalist / Stream processing",
                     "Consumer groups, lag per partition, agent throughput and batch latency.", [
        Panel("Lag by group and topic", [("sum by (group, topic) (loyalist_kafka_consumer_lag_messages)",
                                          "{{group}} {{topic}}")],
              "Messages produced but not yet committed by the group.", "short"),
        Panel("Consumed by group", [(rate("loyalist_kafka_consumer_committed_offset", "group"), "{{group}}")],
              "Rate of committed offsets: messages fully processed per second.", "ops"),
        Panel("Produced by topic", [(rate("loyalist_kafka_topic_end_offset", "topic"), "{{topic}}")],
              "Rate of end offsets of the consumed topics: messages written per second.", "ops"),
        Panel("Lag by partition", [("max by (topic, partition) (loyalist_kafka_consumer_lag_messages)",
                                    "{{topic}}/{{partition}}")],
              "One partition lagging alone points to a hot key or a stuck worker.", "short"),
        Panel("Profile stages by outcome", [(rate("loyalist_profile_events_total", "stage, outcome"),
                                             "{{stage}} {{outcome}}")],
              "Events handled by the identity and fold stages of the profile service.", "ops"),
        Panel("Profile batch duration p99", [(q(0.99, "loyalist_profile_batch_duration_seconds", "stage"),
                                              "{{stage}}")],
              "Time to process one batch, per stage.", "s"),
        Panel("Segmenter inputs by topic", [(rate("loyalist_segmenter_inputs_total", "topic, outcome"),
                                             "{{topic}} {{outcome}}")],
              "Records consumed by the segmenter.", "ops"),
        Panel("Journey engine inputs by topic", [(rate("loyalist_journey_triggers_total", "topic, outcome"),
                                                  "{{topic}} {{outcome}}")],
              "Records consumed by the journey engine.", "ops"),
        Panel("Agent events by outcome", [(rate("loyalist_stream_events_processed_total", "service, agent, outcome"),
                                           "{{service}}/{{agent}} {{outcome}}")],
              "Shared stream-agent counter.", "ops"),
        Panel("Profile messages emitted by topic", [(rate("loyalist_profile_emitted_messages_total", "topic"),
                                                     "{{topic}}")],
              "Resolved events, profile changes and snapshots sent downstream.", "ops"),
        Panel("Agent processing time p99", [(q(0.99, "loyalist_stream_processing_duration_seconds",
                                               "service, agent"), "{{service}}/{{agent}}")],
              "Time to process one event, per stream agent.", "s"),
        Panel("Store call latency p99", [(q(0.99, "loyalist_store_call_duration_seconds",
                                            "service, store, operation"), "{{service}} {{store}} {{operation}}")],
              "Cassandra and Redis calls on the stream path; slow stores make every worker slow.", "s"),
    ])


def profile() -> dict[str, Any]:
    where = f'service="profile", {OPS_ROUTES}'
    fresh = "loyalist_profile_freshness_seconds"
    return dashboard("loyalist-profile", "Loyalist / Profile API", "Profile reads, latency and freshness.", [
        Panel("Requests by route and status", [(rate("loyalist_http_requests_total", "route, status", where),
                                                "{{route}} {{status}}")],
              "Profile API traffic.", "reqps"),
        Panel("Latency by route", [(q(0.5, "loyalist_http_request_duration_seconds", "route", where), "p50 {{route}}"),
                                   (q(0.99, "loyalist_http_request_duration_seconds", "route", where),
                                    "p99 {{route}}")],
              "Reads come from the Redis hot copy; as-of and timeline reads from Cassandra.", "s"),
        Panel("Freshness percentiles", [(q(0.5, fresh), "p50"), (q(0.9, fresh), "p90"), (q(0.99, fresh), "p99")],
              "From ingest acceptance (receivedAt) to the profile update.", "s"),
        Panel("Freshness SLO: share within 5 s", [(
            f'sum(rate({fresh}_bucket{{le="5.0"}}[{RATE}])) / sum(rate({fresh}_count[{RATE}]))', "within 5 s")],
              "Objective 99%; the burn-rate alerts use 5 m, 30 m, 1 h and 6 h windows.", "percentunit",
              extra={"min": 0, "max": 1}),
        Panel("Profile maintenance", [(rate("loyalist_profile_refolds_total"), "refolds"),
                                      (rate("loyalist_profile_forwarded_total"), "forwarded to survivor"),
                                      (rate("loyalist_profile_erasures_total"), "erasures")],
              "Refolds after late events, events forwarded after merges, erasures.", "ops"),
        Panel("Requests in flight", [('sum(loyalist_http_requests_in_flight{service="profile"})', "in flight")],
              "Concurrent requests being handled.", "short"),
    ])


def segments() -> dict[str, Any]:
    return dashboard("loyalist-segments", "Loyalist / Segments & models",
                     "Segment evaluation, membership changes and model quality.", [
        Panel("Live segments", [("max(loyalist_segmenter_segments)", "segments")],
              "Rule segments being maintained.", "short", "stat", 6, 5),
        Panel("Churn model ROC AUC", [("max(loyalist_segmenter_churn_progressive_roc_auc)", "AUC")],
              "Progressive validation (alert below 0.65 or on a 0.05 drop in a day).", "short", "stat", 6, 5,
              extra={"decimals": 3}),
        Panel("Churn model log loss", [("max(loyalist_segmenter_churn_progressive_log_loss)", "log loss")],
              "Progressive-validation log loss of the churn model.", "short", "stat", 6, 5, extra={"decimals": 3}),
        Panel("Segment evaluations", [(rate("loyalist_segmenter_segment_evaluations_total"), "evaluations/s")],
              "Segment rules evaluated for a customer.", "ops", "stat", 6, 5),
        Panel("Membership changes", [(rate("loyalist_segmenter_membership_changes_total", "change"), "{{change}}")],
              "segment.entered / segment.exited emitted.", "ops", stack=True),
        Panel("Decision latency", [(q(0.5, "loyalist_segmenter_decision_duration_seconds"), "p50"),
                                   (q(0.99, "loyalist_segmenter_decision_duration_seconds"), "p99")],
              "Time to decide and apply one customer's memberships.", "s"),
        Panel("Model learning", [(rate("loyalist_segmenter_churn_model_updates_total"), "labelled observations"),
                                 (rate("loyalist_segmenter_predictions_written_total"), "predictions written")],
              "Churn-model updates and Predictions Updated events produced.", "ops"),
        Panel("Churn model quality over time", [("max(loyalist_segmenter_churn_progressive_roc_auc)", "ROC AUC"),
                                                ("max(loyalist_segmenter_churn_progressive_log_loss)", "log loss")],
              "A falling AUC or rising log loss means drift or changed inputs.", "short"),
    ])


def journeys() -> dict[str, Any]:
    return dashboard("loyalist-journeys", "Loyalist / Journeys", "Journey instances, triggers and messages.", [
        # One worker publishes these gauges; max per journey keeps a rebalance's brief overlap from counting twice.
        Panel("Instances by state", [("sum by (state) (max by (journey, state) (loyalist_journey_instances))",
                                      "{{state}}")],
              "Instances per state across journeys (from stored instance states).", "short", stack=True),
        Panel("Instances entered by journey", [(rate("loyalist_journey_instances_entered_total", "journey"),
                                                "{{journey}}")],
              "Instances started per second.", "ops"),
        Panel("Messages requested by channel", [(rate("loyalist_journey_messages_requested_total", "channel"),
                                                 "{{channel}}")],
              "Message requests emitted to notify.", "ops"),
        Panel("Trigger to message latency", [(q(0.5, "loyalist_journey_trigger_latency_seconds"), "p50"),
                                             (q(0.95, "loyalist_journey_trigger_latency_seconds"), "p95")],
              "Triggering event accepted by ingest to message request acknowledged by Kafka.", "s"),
        Panel("Engine inputs by outcome", [(rate("loyalist_journey_triggers_total", "outcome"), "{{outcome}}")],
              "Records consumed by the journey engine.", "ops", stack=True),
        Panel("Instances by journey and state", [("max by (journey, state) (loyalist_journey_instances)",
                                                  "{{journey}} {{state}}")],
              "Where the customers are, per journey.", "short"),
        Panel("Exits by reason", [(rate("loyalist_journey_exits_total", "reason"), "{{reason}}")],
              "Instances ended: completed, converted, exit rules.", "ops", stack=True),
    ])


def notify() -> dict[str, Any]:
    return dashboard("loyalist-notify", "Loyalist / Notifications", "Message requests, delivery and the DLQ.", [
        Panel("Dead-letter queue", [("max(loyalist_notify_dlq_messages)", "messages")],
              "Messages in message.dlq (alert when it grows).", "short", "stat", 6, 5),
        Panel("Scheduled", [("max(loyalist_notify_scheduled_messages)", "messages")],
              "Deferred sends and retries waiting in the schedule.", "short", "stat", 6, 5),
        Panel("Sent", [(rate("loyalist_notify_sent_total"), "messages/s")],
              "Messages accepted by the provider.", "ops", "stat", 6, 5),
        Panel("Provider call p99", [(q(0.99, "loyalist_notify_provider_call_duration_seconds"), "p99")],
              "One call to the email/SMS/webhook provider.", "s", "stat", 6, 5),
        Panel("Requests by outcome", [(rate("loyalist_stream_events_processed_total", "outcome",
                                            'service="notify"'), "{{outcome}}")],
              "Message requests handled: sent, deferred, skipped, duplicate, failed.", "ops", stack=True),
        Panel("Sent by channel and category", [(rate("loyalist_notify_sent_total", "channel, category"),
                                                "{{channel}} {{category}}")],
              "Transactional and marketing messages accepted by the provider.", "ops", stack=True),
        Panel("Delivery latency", [(q(0.5, "loyalist_notify_delivery_latency_seconds", "channel"), "p50 {{channel}}"),
                                   (q(0.95, "loyalist_notify_delivery_latency_seconds", "channel"),
                                    "p95 {{channel}}")],
              "From the request (or its triggering event) to the provider's acceptance.", "s"),
        Panel("Feedback events", [(rate("loyalist_notify_feedback_events_total", "event"), "{{event}}")],
              "Email Sent/Delivered/Opened/... produced back to events.raw.", "ops"),
    ])


DASHBOARDS = {
    "overview": overview, "ingest": ingest, "streams": streams, "profile": profile,
    "segments": segments, "journeys": journeys, "notify": notify,
}


def render_all() -> dict[str, str]:
    return {f"{name}.json": json.dumps(build(), indent=2, sort_keys=True) + "\n" for name, build in DASHBOARDS.items()}


def main() -> int:
    OUT.mkdir(exist_ok=True)
    wanted = render_all()
    for stale in set(p.name for p in OUT.glob("*.json")) - set(wanted):
        (OUT / stale).unlink()
    for name, text in wanted.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(wanted)} dashboards to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
