"""Deploy files agree with the code: they parse, name real metrics, paths, ports and queues.

The alert rules are checked in test_alerts.py, the manifests in test_manifests.py, the image's
pins and hadolint in test_image.py.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import REGISTRY

from service import metrics
from service.config import Settings, load_settings
from service.example import calc
from service.health import Health
from service.http import LIVENESS_PATH, METRICS_PATH, READINESS_PATH, HttpServer
from service.topology import Names, service_topology, to_definitions

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# RabbitMQ's own metrics (rabbitmq_prometheus plugin) that dashboard and alerts may use.
RABBITMQ_METRICS = frozenset(
    {
        "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_consumers",
    }
)
# Series Prometheus itself attaches to every target.
PROMETHEUS_METRICS = frozenset({"up"})

_METRIC_NAME = re.compile(r"\b((?:burrow|rabbitmq)_[a-z0-9_]+|up)\b(?!\s*\()")


def yaml_documents(path: Path) -> list[Any]:
    """The non-empty YAML documents of a file."""
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads((DEPLOY / "grafana/dashboards/burrow.json").read_text())
    return dashboard


def raw_dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard as written, in panel order."""
    return [target["expr"] for panel in _dashboard()["panels"] for target in panel["targets"]]


def resolve_variables(expr: str) -> str:
    """`expr` as Prometheus receives it with every template variable at All (`$__…` kept)."""
    all_values: dict[str, str] = {
        variable["name"]: variable["allValue"]
        for variable in _dashboard()["templating"]["list"]
        if variable.get("includeAll")
    }

    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        return all_values.get(name, match[0])

    return _VARIABLE.sub(value, expr)


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, in panel order, variables at All."""
    return [resolve_variables(expr) for expr in raw_dashboard_queries()]


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of deploy/prometheus/alerts.yml."""
    (doc,) = yaml_documents(DEPLOY / "prometheus/alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (label names and functions are not matched)."""
    without_labels = re.sub(r"\{[^}]*\}", "", expr)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_labels)
    return set(_METRIC_NAME.findall(without_groupings))


def registry_sample_names() -> set[str]:
    """Every sample name Burrow's metrics can expose (counters `_total`, histograms `_bucket`…)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def k8s_objects() -> Iterator[dict[str, Any]]:
    """Every object of the kustomization's resources, in their order."""
    kustomization = yaml_documents(DEPLOY / "k8s/kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        yield from yaml_documents(DEPLOY / "k8s" / resource)


def _default_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    import os

    for name in list(os.environ):
        if name.startswith("BURROW_"):
            monkeypatch.delenv(name)
    return load_settings()


def test_every_deploy_file_parses() -> None:
    """Each YAML and JSON file under deploy/ parses."""
    checked = 0
    for path in sorted(DEPLOY.rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            assert yaml_documents(path), f"{path} is empty"
            checked += 1
        elif path.suffix == ".json":
            assert json.loads(path.read_text(encoding="utf-8")), f"{path} is empty"
            checked += 1
    assert checked >= 12


def test_dashboard_and_alerts_name_only_real_metrics() -> None:
    """Every metric in the dashboard and alerts exists in the registry (or is RabbitMQ's own)."""
    exprs = dashboard_queries() + [rule["expr"] for rule in alert_rules()]
    used = set().union(*(metric_names(expr) for expr in exprs))
    known = registry_sample_names() | RABBITMQ_METRICS | PROMETHEUS_METRICS
    assert used - known == set()
    # The dashboard covers each required signal.
    dashboard = " ".join(dashboard_queries())
    for name in (
        "burrow_messages_handled_total",
        "burrow_handler_duration_seconds_bucket",
        "burrow_handler_in_progress",
        "burrow_dead_lettered_total",
        "burrow_amqp_reconnects_total",
        "burrow_rpc_client_calls_total",
        "rabbitmq_detailed_queue_messages_ready",
    ):
        assert name in dashboard, name


def test_every_metric_is_documented() -> None:
    """docs/operations.md explains every burrow_ metric and every alert."""
    text = (ROOT / "docs/operations.md").read_text(encoding="utf-8")
    for family in REGISTRY.collect():
        if family.name.startswith("burrow_"):
            sample = family.name + ("_total" if family.type == "counter" else "")
            assert sample in text, sample
    for rule in alert_rules():
        assert f"### {rule['alert']}" in text, rule["alert"]
    assert "img/dashboard.png" in text


# Serving-side metrics carry Burrow's `service` label, which the dashboard's $service picks.
_SERVING_METRICS = frozenset(
    {
        "burrow_messages_received_total",
        "burrow_messages_handled_total",
        "burrow_handler_duration_seconds_bucket",
        "burrow_handler_in_progress",
        "burrow_dead_lettered_total",
    }
)


def test_dashboard_has_datasource_and_service_variables() -> None:
    """The dashboard asks for a data source, namespace, job and service, from burrow_build_info."""
    variables = {variable["name"]: variable for variable in _dashboard()["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "job", "service"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "service"):
        variable = variables[name]
        assert variable["type"] == "query"
        assert variable["datasource"]["uid"] == "${datasource}"
        assert variable["query"] == variable["definition"]
        assert variable["includeAll"]
        # `.*` also matches a missing label: compose's targets have no namespace.
        assert variable["allValue"] == ".*"
    assert "burrow_build_info" in variables["namespace"]["definition"]
    assert 'job=~"$job"' in variables["service"]["definition"]


def test_every_panel_query_uses_the_variables() -> None:
    """Each panel and target reads ${datasource}; each selector filters by the chosen service."""
    for panel in _dashboard()["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    for expr in raw_dashboard_queries():
        selectors = re.findall(r"\b((?:burrow|rabbitmq)_[a-z0-9_]+)(\{[^}]*\})?", expr)
        assert selectors, expr
        for name, labels in selectors:
            if name.startswith("rabbitmq_"):
                # The broker's own series: its queues of the chosen services.
                assert r"\\.($service)\\." in labels, expr
                continue
            assert 'namespace=~"$namespace"' in labels, expr
            assert 'job=~"$job"' in labels, expr
            assert ('service=~"$service"' in labels) == (name in _SERVING_METRICS), expr


def test_resolved_queries_select_everything() -> None:
    """With every variable at All, no `$variable` but Grafana's own `$__…` is left."""
    for expr in dashboard_queries():
        assert set(_VARIABLE.findall(expr)) <= {("__rate_interval", "")}, expr


def test_definitions_match_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/rabbitmq/definitions.json equals the definitions generated from the topology."""
    settings = _default_settings(monkeypatch)
    expected = to_definitions(service_topology(calc, settings))
    actual = json.loads((DEPLOY / "rabbitmq/definitions.json").read_text(encoding="utf-8"))
    assert actual == json.loads(json.dumps(expected)), "run `make deploy-files`"


def test_compose_file_validates_against_the_compose_spec() -> None:
    """deploy/compose.yaml is valid per the Compose Specification schema and has the stack."""
    schema = json.loads((DEPLOY / "schemas/compose-spec.json").read_text(encoding="utf-8"))
    (compose,) = yaml_documents(DEPLOY / "compose.yaml")
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(err.absolute_path)}: {err.message}" for err in validator.iter_errors(compose)]
    assert errors == []
    assert set(compose["services"]) == {"rabbitmq", "burrow", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    plugins = (DEPLOY / "rabbitmq/enabled_plugins").read_text(encoding="utf-8")
    assert "rabbitmq_management" in plugins
    assert "rabbitmq_prometheus" in plugins


def _rabbitmq_conf() -> dict[str, str]:
    """deploy/rabbitmq/rabbitmq.conf as key → value (sysctl format: `key = value`, `#` comments)."""
    entries: dict[str, str] = {}
    for raw in (DEPLOY / "rabbitmq/rabbitmq.conf").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not `key = value`: {line!r}"
            entries[key.strip()] = value.strip()
    return entries


def _mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (`128Mi`, `1Gi`) in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0}
    return float(quantity[:-2]) * units[quantity[-2:]]


# docs/operations.md, Memory: peak RSS ≤ idle + (prefetch + 8) * the largest body on the wire.
_COPIES_BEYOND_PREFETCH = 8


def test_broker_caps_message_size_for_the_memory_bound() -> None:
    """rabbitmq.conf sets max_message_size ≥ the body limit; the bound fits the pod's memory."""
    cap = int(_rabbitmq_conf()["max_message_size"])
    assert Settings.model_fields["max_body_bytes"].default <= cap < 128 * 1024 * 1024
    deployment = next(obj for obj in k8s_objects() if obj["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    prefetch = int(env.get("BURROW_PREFETCH") or Settings.model_fields["prefetch"].default)
    resources = container["resources"]
    idle = _mebibytes(resources["requests"]["memory"])  # what an idle process is given
    bound = idle + (prefetch + _COPIES_BEYOND_PREFETCH) * cap / 2**20
    assert bound <= _mebibytes(resources["limits"]["memory"]), (
        f"idle {idle} MiB + ({prefetch} + {_COPIES_BEYOND_PREFETCH}) * {cap} B = {bound:.0f} MiB"
    )
    docs = (ROOT / "docs/operations.md").read_text(encoding="utf-8")
    assert "### Memory" in docs
    assert f"(BURROW_PREFETCH + {_COPIES_BEYOND_PREFETCH})" in docs


def test_dockerfile_agrees_with_the_code() -> None:
    """CMD runs the `burrow` script, EXPOSE is the default HTTP port, HEALTHCHECK gets /healthz."""
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "burrow" in scripts
    assert re.search(r"^FROM python:3\.11-slim AS build$", dockerfile, re.MULTILINE)
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) >= 2
    assert re.search(r'^CMD \["burrow", "run"\]$', dockerfile, re.MULTILINE)
    (exposed,) = re.findall(r"^EXPOSE (\d+)$", dockerfile, re.MULTILINE)
    assert int(exposed) == Settings.model_fields["http_port"].default
    user = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user, "the image must not run as root"
    assert user[-1] not in ("root", "0")
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :].split("\n\n")[0]
    assert LIVENESS_PATH in healthcheck
    assert f"'{exposed}'" in healthcheck


def test_probe_and_metrics_paths_are_served() -> None:
    """The paths named by Dockerfile, Kubernetes probes and ServiceMonitor are routes of http.py."""
    app = HttpServer(Health(), "127.0.0.1", 0).make_app()
    routes = {resource.canonical for resource in app.router.resources()}
    assert routes == {METRICS_PATH, LIVENESS_PATH, READINESS_PATH}
    objects = {obj["kind"]: obj for obj in k8s_objects()}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
        "ServiceMonitor",
    } <= set(objects)
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == LIVENESS_PATH
    assert container["readinessProbe"]["httpGet"]["path"] == READINESS_PATH
    (port,) = container["ports"]
    assert port["containerPort"] == Settings.model_fields["http_port"].default
    (endpoint,) = objects["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["path"] == METRICS_PATH
    assert endpoint["port"] == port["name"]


def test_keda_scales_on_the_request_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ScaledObject watches calc's request queue, and every queue it names exists."""
    settings = _default_settings(monkeypatch)
    declared = {queue.name for queue in service_topology(calc, settings).queues}
    (scaled,) = [obj for obj in k8s_objects() if obj["kind"] == "ScaledObject"]
    queues = [trigger["metadata"]["queueName"] for trigger in scaled["spec"]["triggers"]]
    assert Names(settings.namespace).request_queue(calc.name) in queues
    assert set(queues) <= declared
    deployment = next(obj for obj in k8s_objects() if obj["kind"] == "Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_metrics_module_lists_the_documented_label_values() -> None:
    """Publish outcomes are the five of link.PUBLISH_OUTCOMES; every family has burrow_."""
    assert metrics.PUBLISH_OUTCOMES == ("confirmed", "returned", "nacked", "timeout", "lost")
    names = [family.name for family in REGISTRY.collect() if "burrow" in family.name]
    assert names
    assert all(name.startswith("burrow_") for name in names)
