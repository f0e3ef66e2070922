"""The alert rules fire where they are deployed: under the ServiceMonitor's and compose's labels.

promtool (Debian's `prometheus` package, installed by .ci/run) checks the rules and runs their
unit tests, deploy/prometheus/alerts.test.yml; the PrometheusRule must be the same rules.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.contract.deploy_files import ALERTS, PROMETHEUS_RULE, render_prometheus_rule
from tests.contract.test_deploy import (
    COMPOSE_GATEWAY,
    COMPOSE_IMAGE,
    DEPLOY,
    GATEWAY_DEPLOYMENT,
    ROOT,
    SERVICE_DEPLOYMENT,
    alert_rules,
    compose_services,
    k8s_object,
    k8s_objects,
    yaml_documents,
)
from tests.contract.tools import find_tool, run_tool

ALERT_TESTS = DEPLOY / "prometheus/alerts.test.yml"
# The target label every Burrow scrape carries and the rules select `up` by (never a job name).
TARGET_LABEL = ("app_kubernetes_io_name", "burrow")
RUNBOOK = re.compile(r"^https://[^\s#]+/docs/operations\.md#(?P<anchor>[a-z0-9-]+)$")

_PROMTOOL = "Debian package `prometheus`; .ci/run installs it"
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _promtool() -> str:
    return find_tool("promtool", _PROMTOOL)


def _labels(series: str) -> dict[str, str]:
    """The labels of a promtool input series, `name{a="b", …}`."""
    return {name: value for name, op, value in _MATCHER.findall(series) if op == "="}


def _unit_tests() -> list[dict[str, Any]]:
    (doc,) = yaml_documents(ALERT_TESTS)
    tests: list[dict[str, Any]] = doc["tests"]
    return tests


def _servicemonitor_target(monitor: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The job label a ServiceMonitor gives (its Service's name) and its one endpoint."""
    selector = monitor["spec"]["selector"]["matchLabels"]
    (service,) = [
        obj
        for obj in k8s_objects()
        if obj["kind"] == "Service"
        and selector.items() <= obj["metadata"].get("labels", {}).items()
    ]
    (endpoint,) = monitor["spec"]["endpoints"]
    # Without spec.jobLabel, the Prometheus Operator names the job after the Service.
    assert "jobLabel" not in monitor["spec"]
    return service["metadata"]["name"], endpoint


def _servicemonitor_targets() -> dict[str, dict[str, Any]]:
    """Job label → endpoint of every ServiceMonitor (the service's and the gateway's)."""
    monitors = [obj for obj in k8s_objects() if obj["kind"] == "ServiceMonitor"]
    targets = dict(_servicemonitor_target(monitor) for monitor in monitors)
    assert len(targets) == len(monitors), "two ServiceMonitors give the same job label"
    return targets


def _compose_jobs() -> dict[str, dict[str, Any]]:
    """Compose service → the prometheus.yml job scraping it, for each service of Burrow's image."""
    (config,) = yaml_documents(DEPLOY / "prometheus/prometheus.yml")
    jobs = {}
    for name, service in compose_services().items():
        if service.get("image") == COMPOSE_IMAGE:
            target = f"{name}:{service['environment']['BURROW_HTTP_PORT']}"
            (job,) = [
                job
                for job in config["scrape_configs"]
                if any(target in static["targets"] for static in job["static_configs"])
            ]
            jobs[name] = dict(job)
    return jobs


def test_alerts_pass_promtool() -> None:
    """`promtool check rules` accepts the alert rules, `check config` the Prometheus config."""
    promtool = _promtool()
    for args in (
        ["check", "rules", str(ALERTS)],
        ["check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
    ):
        done = run_tool(promtool, *args)
        assert done.returncode == 0, done.stdout + done.stderr


def test_alert_unit_tests_pass_promtool() -> None:
    """`promtool test rules` passes: each alert fires (and only then) on its test series."""
    done = run_tool(_promtool(), "test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    """alerts.test.yml expects every alert of alerts.yml to fire at least once."""
    fired = {
        case["alertname"]
        for test in _unit_tests()
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_both_scrape_configs_set_the_label_the_rules_select_by() -> None:
    """Each ServiceMonitor and prometheus.yml job of a Burrow process (service and gateway) adds
    app_kubernetes_io_name="burrow" to the target."""
    name, value = TARGET_LABEL
    monitors = _servicemonitor_targets()
    assert set(monitors) == {SERVICE_DEPLOYMENT, GATEWAY_DEPLOYMENT}
    for endpoint in monitors.values():
        assert {"targetLabel": name, "replacement": value} in endpoint["relabelings"]
        assert endpoint["honorLabels"] is True  # Burrow's `service` label is kept (see the file)
    jobs = _compose_jobs()
    assert set(jobs) == {"burrow", COMPOSE_GATEWAY}
    for job in jobs.values():
        assert {"target_label": name, "replacement": value} in job["relabel_configs"]


def test_no_rule_depends_on_a_job_name() -> None:
    """No expression matches on `job`; `up` is selected by the target label only."""
    name, value = TARGET_LABEL
    for rule in alert_rules():
        expr = rule["expr"]
        assert "job" not in {label for label, _, _ in _MATCHER.findall(expr)}, rule["alert"]
        for selector in re.findall(r"\bup\s*(\{[^}]*\})?", expr):
            assert selector == f'{{{name}="{value}"}}', rule["alert"]


def test_unit_tests_use_the_labels_of_real_scrapes() -> None:
    """ServiceMonitor cases carry one's job (its Service's name), compose cases prometheus.yml's;
    the gateway's series carry a gateway job."""
    job, _ = _servicemonitor_target(k8s_object("ServiceMonitor", SERVICE_DEPLOYMENT))
    monitor_jobs = set(_servicemonitor_targets())
    compose = _compose_jobs()
    compose_jobs = {scrape["job_name"] for scrape in compose.values()}
    gateway_jobs = {GATEWAY_DEPLOYMENT, compose[COMPOSE_GATEWAY]["job_name"]}
    name, value = TARGET_LABEL
    tests = _unit_tests()
    by_setup = {
        setup: [test for test in tests if setup in test["name"]]
        for setup in ("ServiceMonitor", "compose")
    }
    assert by_setup["ServiceMonitor"]
    assert by_setup["compose"]
    for setup, expected_jobs in (("ServiceMonitor", monitor_jobs), ("compose", compose_jobs)):
        for test in by_setup[setup]:
            burrow_series = [
                _labels(series["series"])
                for series in test["input_series"]
                if not series["series"].startswith("rabbitmq_")
            ]
            jobs = {labels.get("job") for labels in burrow_series if labels.get(name) == value}
            assert expected_jobs & jobs, test["name"]
    gateway_series = [
        series["series"]
        for test in tests
        for series in test["input_series"]
        if series["series"].startswith("burrow_gateway_")
    ]
    assert gateway_series
    for series in gateway_series:
        assert _labels(series).get("job") in gateway_jobs, series
    (down,) = [test for test in by_setup["ServiceMonitor"] if test["name"].startswith("BurrowDown")]
    fired = [case for case in down["alert_rule_test"] if case["alertname"] == "BurrowDown"]
    assert any(alert["exp_labels"]["job"] == job for case in fired for alert in case["exp_alerts"])


def test_alert_rules_are_well_formed() -> None:
    """Each alert has a severity, a summary and a runbook_url to its section of operations.md."""
    rules = alert_rules()
    assert {
        "BurrowDown",
        "BurrowTargetsMissing",
        "BurrowHighErrorRatio",
        "BurrowHighLatency",
        "BurrowDeadLettersGrowing",
        "BurrowConsumersMissing",
        "BurrowConnectionBlocked",
        "BurrowGatewayErrors",
        "BurrowWebhooksFailing",
    } <= {rule["alert"] for rule in rules}
    docs = (ROOT / "docs/operations.md").read_text(encoding="utf-8")
    bases = set()
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert "runbook" not in rule["annotations"], "the annotation is called runbook_url"
        url = rule["annotations"]["runbook_url"]
        match = RUNBOOK.match(url)
        assert match, url
        assert match["anchor"] == rule["alert"].lower()
        assert f"### {rule['alert']}\n" in docs
        bases.add(url[: match.start("anchor")])
    assert len(bases) == 1, f"one base URL for every runbook link: {bases}"
    assert bases.pop().removesuffix("/operations.md#") in docs, "the base URL is documented"


def test_prometheus_rule_is_alerts_yml() -> None:
    """deploy/k8s/prometheusrule.yaml is alerts.yml in a PrometheusRule (`make deploy-files`)."""
    alerts = ALERTS.read_text(encoding="utf-8")
    manifest = PROMETHEUS_RULE.read_text(encoding="utf-8")
    assert manifest == render_prometheus_rule(alerts), "run `make deploy-files`"
    rule = yaml.safe_load(manifest)
    assert rule["spec"] == yaml.safe_load(alerts)
    assert (
        "prometheusrule.yaml" in yaml_documents(DEPLOY / "k8s/kustomization.yaml")[0]["resources"]
    )
