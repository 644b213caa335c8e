#!/usr/bin/env python3
"""Writes charts/dopd/dashboards/dopd.json, the Grafana dashboard of the operator, router and
worker metrics. Run it after changing a panel: python3 tools/dashboard.py"""

import json

PANELS = [
    # (title, unit, [(expr, legend)])
    ("Operator", None, None),
    ("Desired vs ready instances", "short", [
        ('sum by (service, role) (dopd_operator_desired_replicas{namespace=~"$namespace", service=~"$service"})', "{{service}} {{role}} desired"),
        ('sum by (service, role) (dopd_operator_ready_replicas{namespace=~"$namespace", service=~"$service"})', "{{service}} {{role}} ready"),
    ]),
    ("Forecast of the next interval", "short", [
        ('dopd_operator_predicted_load{namespace=~"$namespace", service=~"$service"}', "{{service}} {{quantity}}"),
    ]),
    ("Planner decisions / min", "short", [
        ('sum by (service, changed) (rate(dopd_operator_planner_decisions_total{namespace=~"$namespace", service=~"$service"}[5m])) * 60', "{{service}} changed={{changed}}"),
    ]),
    ("Reconciles and errors / s", "reqps", [
        ("sum by (result) (rate(dopd_operator_reconciles_total[5m]))", "reconcile {{result}}"),
        ("sum by (kind) (rate(dopd_operator_reconcile_errors_total[5m]))", "error {{kind}}"),
    ]),
    ("Reconcile duration p99", "s", [
        ("histogram_quantile(0.99, sum by (le) (rate(dopd_operator_reconcile_duration_seconds_bucket[5m])))", "p99"),
    ]),
    ("Leader", "short", [("max by (pod) (dopd_operator_leader)", "{{pod}}")]),
    ("Router", None, None),
    ("Requests / s by status", "reqps", [
        ("sum by (endpoint, status) (rate(dopd_router_requests_total[5m]))", "{{endpoint}} {{status}}"),
    ]),
    ("TTFT p50 / p99", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(dopd_router_ttft_seconds_bucket[5m])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(dopd_router_ttft_seconds_bucket[5m])))", "p99"),
    ]),
    ("Inter-token latency p50 / p99", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(dopd_router_itl_seconds_bucket[5m])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(dopd_router_itl_seconds_bucket[5m])))", "p99"),
    ]),
    ("Routing decisions / s", "reqps", [
        ("sum by (class, route, reason) (rate(dopd_router_routing_decisions_total[5m]))", "{{class}} {{route}} {{reason}}"),
    ]),
    ("Waiting in the router, rejected, retries", "short", [
        ("sum(dopd_router_waiting)", "waiting"),
        ("sum(rate(dopd_router_rejected_total[5m]))", "rejected / s"),
        ("sum(rate(dopd_router_retries_total[5m]))", "retries / s"),
        ("sum(rate(dopd_router_stream_errors_total[5m]))", "stream errors / s"),
    ]),
    ("Workers", None, None),
    ("KV cache usage per worker", "percentunit", [
        ("dopd_router_worker_kv_usage", "{{worker}} {{role}}"),
    ]),
    ("In flight per worker", "short", [
        ("dopd_router_worker_in_flight", "{{worker}} {{role}}"),
    ]),
    ("KV transfer bandwidth per link", "Bps", [
        ("dopd_worker_kv_peer_last_bandwidth_bytes_per_second", "{{worker}} <- {{peer}}"),
    ]),
    ("KV transfer failures / s and degraded links", "short", [
        ("sum by (worker, kind) (rate(dopd_worker_kv_pull_failures_total[5m]))", "{{worker}} {{kind}}"),
        ("sum by (worker) (dopd_worker_kv_peer_degraded)", "{{worker}} degraded links"),
    ]),
]


def main():
    panels, y, x, pid = [], 0, 0, 1
    for title, unit, targets in PANELS:
        if targets is None:
            if x:
                y, x = y + 8, 0
            panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
            y += 1
        else:
            panels.append({
                "type": "timeseries", "title": title, "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}},
                "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l}
                            for i, (e, l) in enumerate(targets)],
            })
            x += 8
            if x >= 24:
                y, x = y + 8, 0
        pid += 1
    var = lambda name, query: {
        "name": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name}, "refresh": 2, "includeAll": True, "multi": True,
        "current": {"text": "All", "value": "$__all"}, "allValue": ".*"}
    dash = {
        "title": "DOPD", "uid": "dopd-overview", "schemaVersion": 39, "version": 1,
        "tags": ["dopd", "llm"], "timezone": "browser", "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "current": {"text": "Prometheus", "value": "prometheus"}},
            var("namespace", "label_values(dopd_operator_desired_replicas, namespace)"),
            var("service", 'label_values(dopd_operator_desired_replicas{namespace=~"$namespace"}, service)'),
        ]},
        "panels": panels,
    }
    with open("charts/dopd/dashboards/dopd.json", "w") as f:
        json.dump(dash, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
