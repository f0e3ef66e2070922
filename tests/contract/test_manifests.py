"""The Kubernetes manifests are valid objects: built-in kinds per the API's schemas, custom ones
per their CRDs' (tests/contract/crds.py), and `kubectl kustomize` builds the set.

kubernetes-validate comes from PyPI (`make deploy-tools`, run by `make test`).
"""

from __future__ import annotations

from typing import Any

import jsonschema
import yaml

from tests.contract.crds import CRD_SCHEMAS
from tests.contract.test_deploy import (
    DEPLOY,
    GATEWAY_DEPLOYMENT,
    SERVICE_DEPLOYMENT,
    container_of,
    k8s_object,
    k8s_objects,
    yaml_documents,
)
from tests.contract.tools import find_tool, run_tool

K8S = DEPLOY / "k8s"


def _resources() -> list[str]:
    kustomization = yaml_documents(K8S / "kustomization.yaml")[0]
    resources: list[str] = kustomization["resources"]
    return resources


def _is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS


def test_every_manifest_is_listed_in_the_kustomization() -> None:
    """Each YAML file in deploy/k8s except the kustomization is one of its resources."""
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert files == set(_resources())


def test_builtin_kinds_pass_kubernetes_validate() -> None:
    """Deployment, Service and PodDisruptionBudget validate strictly against the API schemas."""
    program = find_tool("kubernetes-validate", "PyPI `kubernetes-validate`; `make deploy-tools`")
    builtin = [
        resource
        for resource in _resources()
        if not all(_is_custom(obj) for obj in yaml_documents(K8S / resource))
    ]
    assert {
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "gateway-deployment.yaml",
        "gateway-service.yaml",
        "gateway-pdb.yaml",
        "gateway-hpa.yaml",
    } <= set(builtin)
    done = run_tool(program, "--strict", *(str(K8S / resource) for resource in builtin))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # It passes what it has no schema for with a warning: nothing may be left unchecked.
    assert "Couldn't find schema" not in output, output
    passed = output.count(" passed for resource ")
    assert passed == sum(len(yaml_documents(K8S / resource)) for resource in builtin), output


def test_custom_resources_match_their_crd_schemas() -> None:
    """PrometheusRule, ServiceMonitor, ScaledObject and TriggerAuthentication match their CRDs."""
    custom = [obj for obj in k8s_objects() if _is_custom(obj)]
    assert {obj["kind"] for obj in custom} == {kind for _, kind in CRD_SCHEMAS}
    for obj in custom:
        schema = CRD_SCHEMAS[obj["apiVersion"], obj["kind"]]
        validator = jsonschema.Draft202012Validator(schema)
        errors = [f"{list(err.absolute_path)}: {err.message}" for err in validator.iter_errors(obj)]
        assert errors == [], f"{obj['kind']} {obj['metadata']['name']}"


def test_crd_schemas_reject_a_misplaced_field() -> None:
    """The CRD schemas are closed: an unknown key in a rule or an endpoint is an error."""
    for kind, name, path in (
        ("PrometheusRule", "burrow", ("groups", 0, "rules", 0)),
        ("ServiceMonitor", SERVICE_DEPLOYMENT, ("endpoints", 0)),
    ):
        obj = k8s_object(kind, name)
        node: Any = obj["spec"]
        for step in path:
            node = node[step]
        node["runbook"] = "misplaced"
        schema = CRD_SCHEMAS[obj["apiVersion"], kind]
        assert not jsonschema.Draft202012Validator(schema).is_valid(obj), kind


def test_kustomize_builds_every_resource() -> None:
    """`kubectl kustomize deploy/k8s` builds one object per manifest document, labelled."""
    # kubectl comes with the machine image; Debian's (1.20) predates kustomize's `labels`.
    program = find_tool("kubectl", "kubectl >= 1.21 builds kustomizations", required_in_ci=False)
    done = run_tool(program, "kustomize", str(K8S))
    assert done.returncode == 0, done.stdout + done.stderr
    built = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    expected = {(obj["kind"], obj["metadata"]["name"]) for obj in k8s_objects()}
    assert {(obj["kind"], obj["metadata"]["name"]) for obj in built} == expected
    for obj in built:
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "burrow", obj["kind"]


def test_keda_reads_its_own_secret_key() -> None:
    """KEDA's `host` comes from a Secret key that Burrow's container does not read."""
    objects = list(k8s_objects())
    (auth,) = [obj for obj in objects if obj["kind"] == "TriggerAuthentication"]
    (host,) = [ref for ref in auth["spec"]["secretTargetRef"] if ref["parameter"] == "host"]
    for deployment in (SERVICE_DEPLOYMENT, GATEWAY_DEPLOYMENT):
        burrow_keys = {
            (item["valueFrom"]["secretKeyRef"]["name"], item["valueFrom"]["secretKeyRef"]["key"])
            for item in container_of(deployment)["env"]
            if "secretKeyRef" in item.get("valueFrom", {})
        }
        assert ("burrow-amqp", "url") in burrow_keys, deployment
        assert (host["name"], host["key"]) not in burrow_keys, deployment
    (scaled,) = [obj for obj in objects if obj["kind"] == "ScaledObject"]
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert not {"host", "hostFromEnv"} & set(trigger["metadata"]), "the host is a secret"


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def test_selectors_reach_exactly_their_pods() -> None:
    """Each Service and PodDisruptionBudget selects one Deployment's pods, each ServiceMonitor
    one Service, and every port they name exists there."""
    objects = list(k8s_objects())
    deployments = [obj for obj in objects if obj["kind"] == "Deployment"]
    services = [obj for obj in objects if obj["kind"] == "Service"]
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= _pod_labels(deployment).items(), deployment["metadata"]["name"]

    def selected(selector: dict[str, str]) -> dict[str, Any]:
        (deployment,) = [d for d in deployments if selector.items() <= _pod_labels(d).items()]
        return deployment

    for obj in objects:
        name = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "Service":
            (container,) = selected(obj["spec"]["selector"])["spec"]["template"]["spec"][
                "containers"
            ]
            names = {port["name"] for port in container["ports"]}
            assert {port["targetPort"] for port in obj["spec"]["ports"]} <= names, name
        elif obj["kind"] == "PodDisruptionBudget":
            selected(obj["spec"]["selector"]["matchLabels"])
        elif obj["kind"] == "ServiceMonitor":
            match = obj["spec"]["selector"]["matchLabels"]
            (service,) = [s for s in services if match.items() <= s["metadata"]["labels"].items()]
            ports = {port["name"] for port in service["spec"]["ports"]}
            assert {endpoint["port"] for endpoint in obj["spec"]["endpoints"]} <= ports, name


def test_gateway_scales_on_cpu_with_an_hpa() -> None:
    """The HPA scales the gateway Deployment on CPU, 2 to 10; KEDA scales only the service."""
    hpa = k8s_object("HorizontalPodAutoscaler", GATEWAY_DEPLOYMENT)
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    gateway = k8s_object("Deployment", GATEWAY_DEPLOYMENT)
    assert spec["scaleTargetRef"] == {
        "apiVersion": gateway["apiVersion"],
        "kind": "Deployment",
        "name": gateway["metadata"]["name"],
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 10)
    (metric,) = spec["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # The HPA owns the count: a `replicas` here would reset it at every `kubectl apply`.
    assert "replicas" not in gateway["spec"]
    assert container_of(GATEWAY_DEPLOYMENT)["resources"]["requests"]["cpu"]
    # Each Deployment has exactly one autoscaler; the gateway consumes no work queue.
    scaled = [
        (obj["kind"], obj["spec"]["scaleTargetRef"]["name"])
        for obj in k8s_objects()
        if obj["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    ]
    assert sorted(scaled) == [
        ("HorizontalPodAutoscaler", GATEWAY_DEPLOYMENT),
        ("ScaledObject", SERVICE_DEPLOYMENT),
    ]
    # Drains keep a replica, and never block: the budget is below the HPA's floor.
    budget = k8s_object("PodDisruptionBudget", GATEWAY_DEPLOYMENT)
    assert 0 < budget["spec"]["minAvailable"] < spec["minReplicas"]
