"""The dashboards, alert rules and KEDA scalers in deploy/ against the /metrics of a live run: every series an
expression uses exists (declared, with samples), and carries every label the expression groups,
joins or filters by. A rule over a series the service does not export would never fire."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.settings import PROJECT_ROOT
from tests.jobs import wait_for
from workers.scripted_engine import ScriptedEngine

ALERTS = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "teachercache.json"
K8S = PROJECT_ROOT / "deploy" / "k8s"
SERIES = re.compile(r"\b(teachercache_[a-z_]+)(\{[^}]*\})?")
GROUPING = re.compile(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
# Series that exist only for some deployments (a priced teacher): declared, maybe without samples.
MAY_BE_EMPTY = {"teachercache_teacher_spent_usd_total"}


def expressions() -> list[tuple[str, str]]:
    rules = [(rule["alert"], rule["expr"]) for group in yaml.safe_load(ALERTS.read_text())["groups"]
             for rule in group["rules"]]
    panels = [(panel["title"], target["expr"]) for panel in json.loads(DASHBOARD.read_text())["panels"]
              for target in panel["targets"]]
    scalers = [(f"{path.name}: {doc['metadata']['name']}", trigger["metadata"]["query"])
               for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
               if doc and doc.get("kind") == "ScaledObject" for trigger in doc["spec"]["triggers"]]
    return rules + panels + scalers


def uses(expr: str) -> dict[str, set[str]]:
    """Each series the expression reads, with the labels it needs that series to carry."""
    grouped = {label.strip() for labels in GROUPING.findall(expr) for label in labels.split(",") if label.strip()}
    found: dict[str, set[str]] = {}
    for name, matchers in SERIES.findall(expr):
        found.setdefault(name, set()).update(grouped, MATCHER.findall(matchers or ""))
    return found


@pytest.fixture
def live_metrics(api, rt, start_worker) -> dict[str, list]:
    """A run with computed, cached and failed requests, then one scrape."""
    requests = [{"custom_id": f"q{i}", "prompt_token_ids": [1, 2, 300 + i]} for i in range(6)]
    requests.append({"custom_id": "bad", "prompt_token_ids": [1, 4242]})
    body = {"requests": requests, "top_logprobs": 2, "sampling": {"max_tokens": 4}}
    start_worker(ScriptedEngine(fail_tokens=frozenset({4242})))
    wait_for(api, api.post("/v1/jobs", json=body).json()["id"], timeout=60)
    wait_for(api, api.post("/v1/jobs", json=body).json()["id"], timeout=60)  # answered from the cache
    families = text_string_to_metric_families(api.get("/metrics").text)
    return {family.name: family.samples for family in families}


def sample_names(samples) -> set[str]:
    return {sample.name for sample in samples}


def test_every_alert_and_panel_reads_series_the_service_exports_with_the_labels_they_use(live_metrics):
    by_sample = {}
    for family, samples in live_metrics.items():
        for name in sample_names(samples) | {family, f"{family}_total"}:
            by_sample.setdefault(name, []).extend(samples)
    problems = []
    for where, expr in expressions():
        for series, labels in uses(expr).items():
            if series not in by_sample:
                problems.append(f"{where}: {series} is not exported")
                continue
            samples = [s for s in by_sample[series] if s.name == series]
            if not samples:
                if series not in MAY_BE_EMPTY:
                    problems.append(f"{where}: {series} has no samples in a live run")
                continue
            missing = {label for label in labels if all(label not in s.labels for s in samples)}
            if missing:
                problems.append(f"{where}: {series} has no label {sorted(missing)}")
    assert problems == []


def test_the_parser_sees_what_the_rules_use():
    """The checker itself: a made-up series and label are reported, not silently passed."""
    assert uses('sum by (teacher) (rate(teachercache_x_total{outcome="failed"}[5m]))') == {
        "teachercache_x_total": {"teacher", "outcome"}}
    assert len(expressions()) >= 6 + 10 + 2  # alerts, panels, KEDA scalers
