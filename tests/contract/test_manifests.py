"""The Kubernetes manifests are valid objects: built-in kinds per the API's schemas, custom ones
per their CRDs' (tests/contract/crds.py), and `kubectl kustomize` builds the set.

kubernetes-validate comes from PyPI (`make deploy-tools`, run by `make test`).
"""

from __future__ import annotations

from typing import Any

import jsonschema
import yaml

from tests.contract.crds import CRD_SCHEMAS
from tests.contract.test_deploy import DEPLOY, k8s_objects, yaml_documents
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
    assert {"deployment.yaml", "service.yaml", "pdb.yaml"} <= set(builtin)
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
    for kind, path in (
        ("PrometheusRule", ("groups", 0, "rules", 0)),
        ("ServiceMonitor", ("endpoints", 0)),
    ):
        (obj,) = [obj for obj in k8s_objects() if obj["kind"] == kind]
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
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    burrow_keys = {
        (item["valueFrom"]["secretKeyRef"]["name"], item["valueFrom"]["secretKeyRef"]["key"])
        for item in container["env"]
        if "secretKeyRef" in item.get("valueFrom", {})
    }
    assert ("burrow-amqp", "url") in burrow_keys
    assert (host["name"], host["key"]) not in burrow_keys
    (scaled,) = [obj for obj in objects if obj["kind"] == "ScaledObject"]
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert not {"host", "hostFromEnv"} & set(trigger["metadata"]), "the host is a secret"
