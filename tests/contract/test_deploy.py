"""Deploy files agree with the code: they parse, name real metrics, paths, ports and queues.

The alert rules are checked in test_alerts.py, the manifests in test_manifests.py, the image's
pins and hadolint in test_image.py.
"""

from __future__ import annotations

import importlib
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
from prometheus_client.metrics import MetricWrapperBase

from service._observe import metrics
from service._protocol.config import Settings, load_settings
from service._protocol.topology import service_topology, to_definitions
from service._protocol.vocabulary import Names
from service._runtime.health import Health
from service._runtime.http import LIVENESS_PATH, METRICS_PATH, READINESS_PATH, HttpServer
from service.cli import DEFAULT_TARGET
from service.example import calc

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# The Deployments of deploy/k8s: the calc service (`burrow run`) and the HTTP gateway.
SERVICE_DEPLOYMENT = "burrow-calc"
GATEWAY_DEPLOYMENT = "burrow-gateway"
# What the compose file names its Burrow services, and the image the Dockerfile builds for them.
COMPOSE_SERVICE, COMPOSE_GATEWAY, COMPOSE_IMAGE = "burrow", "gateway", "burrow:dev"
# The dashboard row whose panels show the gateway's own metrics.
GATEWAY_ROW = "Gateway"
# The gateway's own metric families (service/_observe/metrics.py), per route or outcome.
GATEWAY_METRICS: tuple[MetricWrapperBase, ...] = (
    metrics.GATEWAY_REQUESTS,
    metrics.GATEWAY_DURATION,
    metrics.GATEWAY_IN_PROGRESS,
    metrics.WEBHOOK_DELIVERIES,
)

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


def dashboard_rows() -> dict[str, list[dict[str, Any]]]:
    """The dashboard's graph panels by the title of the row they sit under ("" above the first)."""
    rows: dict[str, list[dict[str, Any]]] = {"": []}
    current = ""
    for panel in _dashboard()["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            assert current not in rows, f"two rows titled {current!r}"
            assert not panel.get("collapsed"), "a collapsed row hides its panels from this list"
            rows[current] = []
        else:
            rows[current].append(panel)
    return rows


def dashboard_panels() -> list[dict[str, Any]]:
    """Every graph panel of the Grafana dashboard (rows left out), in order."""
    return [panel for panels in dashboard_rows().values() for panel in panels]


def raw_dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard as written, in panel order."""
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


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


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    """The one object of the kustomization with this kind and name."""
    found: list[dict[str, Any]] = [
        obj for obj in k8s_objects() if obj["kind"] == kind and obj["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} objects"
    return found[0]


def container_of(deployment: str) -> dict[str, Any]:
    """The one container of a Deployment of deploy/k8s."""
    pod = k8s_object("Deployment", deployment)["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = pod["containers"]
    (container,) = containers
    return container


def compose_services() -> dict[str, dict[str, Any]]:
    """The services of deploy/compose.yaml by name."""
    (compose,) = yaml_documents(DEPLOY / "compose.yaml")
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def _env_values(container: dict[str, Any]) -> dict[str, str | None]:
    """A container's environment as name → literal value (None when taken from a reference)."""
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def _assert_burrow_settings(names: Iterator[str] | list[str], where: str) -> None:
    """Each BURROW_* name is a Settings field: a misspelt setting would be silently ignored."""
    for name in names:
        if name.startswith("BURROW_"):
            assert name.removeprefix("BURROW_").lower() in Settings.model_fields, (where, name)


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
        "burrow_gateway_requests_total",
        "burrow_gateway_request_duration_seconds_bucket",
        "burrow_gateway_requests_in_progress",
        "burrow_gateway_webhooks_total",
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


def gateway_sample_names() -> set[str]:
    """The sample names of the gateway's own metric families (`…_total`, `…_bucket`…)."""
    families = {family.name for metric in GATEWAY_METRICS for family in metric.describe()}
    return {
        name
        for name in registry_sample_names()
        if any(name == family or name.startswith(f"{family}_") for family in families)
    }


def test_gateway_metrics_have_no_service_label() -> None:
    """The gateway's families are the burrow_gateway_ ones, labelled by route/code/outcome only."""
    families = {family.name for metric in GATEWAY_METRICS for family in metric.describe()}
    registered = {f.name for f in REGISTRY.collect() if f.name.startswith("burrow_gateway_")}
    assert families == registered
    for metric in GATEWAY_METRICS:
        # prometheus_client keeps a family's label names only in this attribute.
        labels = set(metric._labelnames)
        assert labels <= {"route", "code", "outcome"}, labels
        assert "service" not in labels


def test_every_panel_query_uses_the_variables() -> None:
    """Each panel reads ${datasource}; each selector filters by namespace, job and, where it has
    Burrow's `service` label, the chosen service."""
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    gateway_metrics = gateway_sample_names()
    for row, panels in dashboard_rows().items():
        for expr in (target["expr"] for panel in panels for target in panel["targets"]):
            selectors = re.findall(r"\b((?:burrow|rabbitmq)_[a-z0-9_]+)(\{[^}]*\})?", expr)
            assert selectors, expr
            for name, labels in selectors:
                if name.startswith("rabbitmq_"):
                    # The broker's own series: its queues of the chosen services.
                    assert r"\\.($service)\\." in labels, expr
                    continue
                assert 'namespace=~"$namespace"' in labels, expr
                assert 'job=~"$job"' in labels, expr
                if row == GATEWAY_ROW:
                    # The gateway row shows the gateway's own metrics only; they carry no
                    # `service` label (test above), so $service cannot apply: $job picks them.
                    assert name in gateway_metrics, expr
                    assert "service" not in labels, expr
                else:
                    assert name not in gateway_metrics, f"{expr}: belongs in the {GATEWAY_ROW} row"
                    assert ('service=~"$service"' in labels) == (name in _SERVING_METRICS), expr


def test_dashboard_has_a_gateway_row() -> None:
    """The Gateway row shows rate per route, 5xx ratio, p95 per route, in-progress, webhooks."""
    rows = dashboard_rows()
    assert list(rows)[-1] == GATEWAY_ROW, "the gateway's row comes last"
    exprs = [" ".join(target["expr"] for target in panel["targets"]) for panel in rows[GATEWAY_ROW]]

    def panel_starting(prefix: str) -> None:
        assert len([expr for expr in exprs if expr.startswith(prefix)]) == 1, prefix

    panel_starting("sum by (route) (rate(burrow_gateway_requests_total{")
    panel_starting(
        '(sum by (route) (rate(burrow_gateway_requests_total{namespace=~"$namespace", '
        'job=~"$job", code=~"5.."}'
    )
    panel_starting(
        "histogram_quantile(0.95, sum by (route, le) "
        "(rate(burrow_gateway_request_duration_seconds_bucket{"
    )
    panel_starting("sum by (route) (burrow_gateway_requests_in_progress{")
    panel_starting("sum by (outcome) (rate(burrow_gateway_webhooks_total{")


def test_dashboard_panels_do_not_overlap() -> None:
    """Every panel fits the 24-column grid and no two panels (rows included) share a cell."""
    taken: dict[tuple[int, int], str] = {}
    ids = [panel["id"] for panel in _dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in _dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[x, y]}"
                taken[x, y] = panel["title"]


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
    assert set(compose["services"]) == {"rabbitmq", "burrow", "gateway", "prometheus", "grafana"}
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
    container = container_of(SERVICE_DEPLOYMENT)  # the consumer of the queues, by prefetch
    env = _env_values(container)
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
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ScaledObject",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    } <= {obj["kind"] for obj in k8s_objects()}
    container = container_of(SERVICE_DEPLOYMENT)
    assert container["args"] == ["burrow", "run", DEFAULT_TARGET]
    assert container["livenessProbe"]["httpGet"]["path"] == LIVENESS_PATH
    assert container["readinessProbe"]["httpGet"]["path"] == READINESS_PATH
    (port,) = container["ports"]
    assert port["containerPort"] == Settings.model_fields["http_port"].default
    (endpoint,) = k8s_object("ServiceMonitor", SERVICE_DEPLOYMENT)["spec"]["endpoints"]
    assert endpoint["path"] == METRICS_PATH
    assert endpoint["port"] == port["name"]


def test_gateway_deployment_agrees_with_the_code() -> None:
    """`burrow gateway` of calc; API and metrics ports and probe paths are the code's defaults."""
    service = container_of(SERVICE_DEPLOYMENT)
    gateway = container_of(GATEWAY_DEPLOYMENT)
    assert gateway["args"] == ["burrow", "gateway", DEFAULT_TARGET]
    module, attribute = DEFAULT_TARGET.split(":")
    assert getattr(importlib.import_module(module), attribute) is calc
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert ports == {
        "api": Settings.model_fields["gateway_port"].default,
        "http": Settings.model_fields["http_port"].default,
    }
    env = _env_values(gateway)
    assert int(env["BURROW_GATEWAY_PORT"] or 0) == ports["api"]
    assert int(env["BURROW_HTTP_PORT"] or 0) == ports["http"]
    for probe, path in (
        ("livenessProbe", LIVENESS_PATH),
        ("readinessProbe", READINESS_PATH),
        ("startupProbe", LIVENESS_PATH),
    ):
        assert gateway[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    (endpoint,) = k8s_object("ServiceMonitor", GATEWAY_DEPLOYMENT)["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", METRICS_PATH)
    # Built and hardened as the service's: same image, user, seccomp and container context.
    assert gateway["image"] == service["image"]
    assert gateway["securityContext"] == service["securityContext"]
    pods = [
        k8s_object("Deployment", name)["spec"]["template"]["spec"]
        for name in (SERVICE_DEPLOYMENT, GATEWAY_DEPLOYMENT)
    ]
    assert pods[0]["securityContext"] == pods[1]["securityContext"]
    assert pods[0]["terminationGracePeriodSeconds"] == pods[1]["terminationGracePeriodSeconds"]
    assert gateway["resources"]["requests"]["cpu"], "the HPA's utilization is of this request"
    assert gateway["resources"]["limits"]["memory"]
    _assert_burrow_settings(list(env), GATEWAY_DEPLOYMENT)
    _assert_burrow_settings(list(_env_values(service)), SERVICE_DEPLOYMENT)


def test_gateway_deployment_takes_its_secrets_from_secrets() -> None:
    """API keys are a file from a Secret, the webhook secret a Secret key; auth stays on."""
    gateway = container_of(GATEWAY_DEPLOYMENT)
    pod = k8s_object("Deployment", GATEWAY_DEPLOYMENT)["spec"]["template"]["spec"]
    env = {item["name"]: item for item in gateway["env"]}
    assert "BURROW_GATEWAY_API_KEYS" not in env, "keys in a manifest leak: use the _FILE"
    assert env.get("BURROW_GATEWAY_AUTH", {}).get("value", "api-key") == "api-key"
    keys_file = Path(env["BURROW_GATEWAY_API_KEYS_FILE"]["value"])
    (mount,) = [m for m in gateway["volumeMounts"] if keys_file.parent == Path(m["mountPath"])]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    items = {item["path"]: item["key"] for item in volume["secret"].get("items", [])}
    assert keys_file.name in items or not items, "the file is a key of the Secret"
    assert "secretKeyRef" in env["BURROW_GATEWAY_WEBHOOK_SECRET"]["valueFrom"]
    assert env["BURROW_GATEWAY_CALLBACK_HOSTS"]["value"], "an empty allow-list refuses callbacks"


def test_gateway_compose_service_agrees_with_the_code() -> None:
    """compose's gateway runs `burrow gateway` of calc on the default ports, after its broker."""
    services = compose_services()
    gateway, service = services[COMPOSE_GATEWAY], services[COMPOSE_SERVICE]
    assert gateway["image"] == service["image"] == COMPOSE_IMAGE
    assert gateway["build"] == service["build"]  # whichever is built first, the image is one
    assert gateway["command"] == ["burrow", "gateway", DEFAULT_TARGET]
    env = gateway["environment"]
    api_port = Settings.model_fields["gateway_port"].default
    http_port = Settings.model_fields["http_port"].default
    assert int(env["BURROW_GATEWAY_PORT"]) == api_port
    assert int(env["BURROW_HTTP_PORT"]) == http_port
    published = [str(port).rsplit(":", 2)[-2:] for port in gateway["ports"]]
    assert published == [[str(api_port), str(api_port)]], "only the API, on the host's 8080"
    assert env["BURROW_GATEWAY_API_KEYS"].startswith("${BURROW_GATEWAY_API_KEYS"), "from the env"
    assert env["BURROW_AMQP_URL"] == service["environment"]["BURROW_AMQP_URL"]
    assert gateway["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}
    assert COMPOSE_SERVICE in gateway["depends_on"]
    for name in (COMPOSE_SERVICE, COMPOSE_GATEWAY):
        _assert_burrow_settings(list(services[name]["environment"]), name)


def test_prometheus_scrapes_every_compose_burrow_process() -> None:
    """prometheus.yml scrapes each compose service of the Burrow image on its HTTP port."""
    (config,) = yaml_documents(DEPLOY / "prometheus/prometheus.yml")
    targets = {
        target: job
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    burrow = {name: s for name, s in compose_services().items() if s.get("image") == COMPOSE_IMAGE}
    assert set(burrow) == {COMPOSE_SERVICE, COMPOSE_GATEWAY}
    for name, service in burrow.items():
        job = targets[f"{name}:{service['environment']['BURROW_HTTP_PORT']}"]
        assert job.get("metrics_path", METRICS_PATH) == METRICS_PATH, name


def test_keda_scales_on_the_request_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ScaledObject watches calc's request queue, and every queue it names exists."""
    settings = _default_settings(monkeypatch)
    declared = {queue.name for queue in service_topology(calc, settings).queues}
    (scaled,) = [obj for obj in k8s_objects() if obj["kind"] == "ScaledObject"]
    queues = [trigger["metadata"]["queueName"] for trigger in scaled["spec"]["triggers"]]
    assert Names(settings.namespace).request_queue(calc.name) in queues
    assert set(queues) <= declared
    assert scaled["spec"]["scaleTargetRef"]["name"] == SERVICE_DEPLOYMENT


def test_metrics_module_lists_the_documented_label_values() -> None:
    """Publish outcomes are the five of link.PUBLISH_OUTCOMES; every family has burrow_."""
    assert metrics.PUBLISH_OUTCOMES == ("confirmed", "returned", "nacked", "timeout", "lost")
    names = [family.name for family in REGISTRY.collect() if "burrow" in family.name]
    assert names
    assert all(name.startswith("burrow_") for name in names)
