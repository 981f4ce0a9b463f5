"""The Helm chart (deploy/helm/edgetune): lints, renders offline with its defaults and with each
optional part switched, and every rendered manifest validates against the Kubernetes schemas.

Helm runs in-process through the PyPI package helm-python-sdk (Helm v4's Go library behind a C
ABI, loaded with ctypes): no helm binary, cluster or network. (helm-sdkpy, the other such
package, needs Python >= 3.12.) Schemas: kubernetes-validate, which ships them.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
from typing import Any

import pytest

from tests.deploy_support import CHART, DASHBOARD, MOSQUITTO_DIR, config_lines, load_yaml, load_yaml_all, need_module

HELM_HINT = "pip install helm-python-sdk==0.2.2 (linux x86_64 wheel; Python >= 3.10)"
KV_HINT = "pip install kubernetes-validate==1.37.0"

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema set
# that kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", "latest")

RELEASE = "demo"
NAMESPACE = "fleet"

# ServiceMonitor is a CRD (Prometheus Operator) that kubernetes-validate has no schema for:
# checked against this minimal schema of the fields the chart sets.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}

# The chart generates no passwords: every render here gives them (unless a test says base=False).
PASSWORDS: dict[str, Any] = {
    "broker": {"password": "aggregator-password-0123456789"},
    "mosquitto": {"agents": [{"username": f"agent-{i}", "password": f"agent-{i}-password-0123456789"}
                             for i in (1, 2, 3)]},
}


def with_passwords(values: dict[str, Any]) -> dict[str, Any]:
    """`values` over PASSWORDS (mappings merged, anything else replaced), a new dict."""
    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            return {**copy.deepcopy(base), **{k: merge(base.get(k), v) for k, v in over.items()}}
        return copy.deepcopy(over)

    return merge(PASSWORDS, values)


# PrometheusRule (Prometheus Operator CRD), likewise: the fields the chart sets. promtool checks
# the rules themselves (tests/test_deploy_helm_rules.py).
PROMETHEUS_RULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"},
                                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

# cert-manager's Certificate (a CRD too), likewise: the fields the chart sets.
_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}
CERTIFICATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "properties": {
                "secretName": SERVICE_MONITOR_SCHEMA["properties"]["metadata"]["properties"]["name"],
                "issuerRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1}, "kind": {"type": "string"},
                                   "group": {"type": "string"}},
                },
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {**_STRINGS, "minItems": 1},
                "ipAddresses": _STRINGS,
                "duration": {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(h|m|s))+$"},
                "renewBefore": {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(h|m|s))+$"},
                "usages": {"type": "array", "items": {"enum": [
                    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
                    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
                    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
                    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]}},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": {"type": "integer"},
                                   "encoding": {"enum": ["PKCS1", "PKCS8"]},
                                   "rotationPolicy": {"enum": ["Never", "Always"]}},
                },
            },
        },
    },
}

CRD_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA, "PrometheusRule": PROMETHEUS_RULE_SCHEMA,
               "Certificate": CERTIFICATE_SCHEMA}

# name -> values overriding the defaults
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "external-broker": {"mosquitto": {"enabled": False}, "externalBroker": {"url": "mqtts://mqtt.example.com:8883"}},
    "persistence-off": {"persistence": {"enabled": False}, "mosquitto": {"persistence": {"enabled": False}}},
    "grafana-dashboard": {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "EdgeTune"}}},
    "existing-secret-and-claim": {
        "broker": {"existingSecret": "my-broker-credentials"},
        "persistence": {"existingClaim": "my-checkpoints", "storageClass": "-"},
    },
    "hardened": {
        "networkPolicy": {
            "enabled": True,
            "mqttFrom": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "aggregatorEgress": [{"to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}], "ports": [{"port": 443}]}],
        },
        "mosquitto": {"podDisruptionBudget": {"enabled": True}},
        "serviceAccount": {"name": "edgetune-trainer", "annotations": {"iam.gke.io/gcp-service-account": "t@p.iam"}},
        "aggregator": {
            "extraEnv": [{"name": "EDGETUNE_MODEL", "value": "/models/qwen"}],
            "extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
            "extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        },
    },
    "network-policy-external-broker": {
        "networkPolicy": {"enabled": True, "aggregatorEgress": [{"ports": [{"port": 8883}]}]},
        "mosquitto": {"enabled": False},
        "externalBroker": {"url": "mqtts://mqtt.example.com:8883"},
        "serviceAccount": {"create": False, "name": "existing-sa"},
    },
    "alerts": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "dpEpsilonBudget": 8,
                           "extraRules": [{"alert": "EdgeTuneCustom", "expr": "vector(1) > 2", "for": "5m",
                                           "labels": {"severity": "info"}}]},
    },
    # the broker's certificate from cert-manager, devices outside the cluster: TLS only, the
    # aggregator too (mqtts:// with the CA)
    "tls-cert-manager": {
        "broker": {"tls": {"enabled": True, "certManager": {
            "issuerRef": {"name": "fleet-ca", "kind": "ClusterIssuer"}, "dnsNames": ["mqtt.example.com"],
            "ipAddresses": ["203.0.113.9"], "duration": "2160h", "renewBefore": "360h"}}},
        "mosquitto": {"service": {"type": "LoadBalancer"}},
        "networkPolicy": {"enabled": True},
    },
    "tls-existing-secret": {"broker": {"tls": {"enabled": True, "existingSecret": "fleet-broker-tls"}}},
    # mutual TLS, the aggregator on the plain listener's internal Service (no client certificate)
    "tls-mutual": {
        "broker": {"tls": {"enabled": True, "existingSecret": "fleet-broker-tls", "requireClientCertificate": True,
                           "keepPlainListener": True}},
        "mosquitto": {"service": {"type": "NodePort"}},
        "networkPolicy": {"enabled": True, "mqttFrom": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
    },
    # mutual TLS only: the aggregator presents a client certificate from the broker's issuer ...
    "tls-mutual-cert-manager": {
        "broker": {"tls": {"enabled": True, "requireClientCertificate": True, "certManager": {
            "issuerRef": {"name": "fleet-ca", "kind": "ClusterIssuer"}, "duration": "2160h"}}},
        "networkPolicy": {"enabled": True},
    },
    # ... or a provisioned fleet's (`edgetune provision init`): the broker's certificate, the
    # aggregator's and the fleet's signing key in existing Secrets, models for serving devices
    "tls-mutual-existing-secret": {
        "broker": {"tls": {"enabled": True, "existingSecret": "fleet-broker-tls", "requireClientCertificate": True}},
        "aggregator": {"tls": {"existingSecret": "fleet-aggregator-tls"}, "signing": {"existingSecret": "fleet-signing"},
                       "publishModel": "final"},
        "mosquitto": {"service": {"type": "LoadBalancer"}},
    },
    "everything": {
        "serviceMonitor": {"enabled": True},
        "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
        "aggregator": {"extraSettings": {"EDGETUNE_ROUNDS": 20}, "runtimeClassName": "nvidia",
                       "nodeSelector": {"nvidia.com/gpu.present": "true"}},
        "persistence": {"storageClass": "fast"},
        "mosquitto": {"service": {"type": "LoadBalancer"}, "persistence": {"storageClass": "-"}},
    },
}


@pytest.fixture(scope="module")
def helm():
    mod = need_module("helm_python", HELM_HINT)
    mod.disable_logging()
    return mod


@pytest.fixture(scope="module")
def kv():
    return need_module("kubernetes_validate", KV_HINT)


@pytest.fixture(scope="module")
def chart(helm):
    c = helm.Chart.load(str(CHART))
    yield c
    c.close()


def jsonschema_best_match(validator, doc):
    import jsonschema

    return jsonschema.exceptions.best_match(validator.iter_errors(doc))


def render(chart, values: dict[str, Any], base: bool = True) -> dict[str, str]:
    values = with_passwords(values) if base else copy.deepcopy(values)
    return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            try:
                docs.extend(load_yaml_all(text))
            except Exception as e:  # noqa: BLE001 - say which template
                pytest.fail(f"{path} does not render to valid YAML: {e}")
    return docs


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


@functools.lru_cache(maxsize=None)
def _kube_validator(kind: str, api_version: str, version: str):
    """A cached validator for one kind: what kubernetes_validate.validate(strict=True) builds on
    every call (it re-reads the multi-megabyte definitions file each time)."""
    import jsonschema
    import referencing
    from kubernetes_validate import utils

    # rbac.authorization.k8s.io/v1 -> rbac-v1, apps/v1 -> apps-v1, v1 -> v1
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    version = [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(version)][-1]
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    try:
        schema = utils.schema_contents(f"{folder}/{kind.lower()}-{api}.json", version)
    except FileNotFoundError:
        pytest.fail(f"kubernetes-validate has no schema for {kind} {api_version} (Kubernetes {version})")
    definitions = _kube_definitions(folder, version)
    registry = referencing.Resource.from_contents(schema) @ (definitions @ referencing.Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


@functools.lru_cache(maxsize=None)
def _kube_definitions(folder: str, version: str):
    import referencing
    from kubernetes_validate import utils

    return referencing.Resource.from_contents(utils.schema_contents(f"{folder}/_definitions.json", version))


def validate(kv, doc: dict[str, Any]) -> None:
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("kind") in CRD_SCHEMAS:
        import jsonschema

        try:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        except jsonschema.ValidationError as e:
            pytest.fail(f"{where}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
        return
    for version in KUBE_VERSIONS:
        version = kv.latest_version() if version == "latest" else version
        error = jsonschema_best_match(_kube_validator(doc["kind"], doc["apiVersion"], version), doc)
        if error is not None:
            pytest.fail(f"{where} is not valid Kubernetes {version}: {error.message} at {'.'.join(map(str, error.path))}")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_chart_lints(helm, scenario):
    report = helm.lint(str(CHART), with_passwords(SCENARIOS[scenario]), strict=True, namespace=NAMESPACE)
    # severity 1 (info: "icon is recommended") is fine; warnings and errors are not
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], f"helm lint ({scenario}): {problems} {report['errors']}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_chart_renders_valid_manifests(chart, kv, scenario):
    rendered = render(chart, SCENARIOS[scenario])
    docs = manifests(rendered)
    assert docs, "the chart rendered nothing"
    names = set()
    for doc in docs:
        validate(kv, doc)
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in names, f"{key} rendered twice"
        names.add(key)
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == RELEASE, key
    # one resource per template
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            assert len(load_yaml_all(text)) <= 1, f"{path} renders more than one resource"
    assert "NOTES.txt" in " ".join(rendered), "NOTES.txt is missing"


def test_validator_refuses_a_bad_manifest(chart, kv):
    """The schema check is real: an unknown field in a container fails it, with the cached
    validator as with kubernetes_validate.validate itself."""
    job = by_kind(manifests(render(chart, {})))["Job"][0]
    kv.validate(job, "1.25.0", strict=True)
    job["spec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(job, "1.25.0", strict=True)
    assert jsonschema_best_match(_kube_validator("Job", "batch/v1", "1.25.0"), job) is not None


def _settings(kinds) -> dict[str, str]:
    [cm] = [c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-settings")]
    return cm["data"]


def _secret_data(secret) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_defaults(chart):
    kinds = by_kind(manifests(render(chart, {})))
    assert sorted(kinds) == ["ConfigMap", "Job", "PersistentVolumeClaim", "Secret", "Service", "ServiceAccount",
                             "StatefulSet"]
    [job] = kinds["Job"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    [checkpoints] = [v for v in pod["volumes"] if v["name"] == "checkpoints"]
    assert checkpoints["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"][0]["metadata"]["name"]

    settings = _settings(kinds)
    assert settings["EDGETUNE_BROKER_URL"] == f"mqtt://{RELEASE}-edgetune-mosquitto:1883"
    assert settings["EDGETUNE_METRICS_PORT"] == "9100"
    assert "EDGETUNE_OUTPUT_DIR" not in settings  # the Job's own, per run
    env = {e["name"]: e for e in container["env"]}
    assert env["EDGETUNE_OUTPUT_DIR"]["value"] == "/var/lib/edgetune/checkpoints/run1"
    assert {"name": "checkpoints", "mountPath": "/var/lib/edgetune/checkpoints"} in container["volumeMounts"]
    assert env["EDGETUNE_MQTT_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "mqtt-password"

    # the broker's password file holds the aggregator and every agent, with the passwords the
    # Secret hands out
    [secret] = kinds["Secret"]
    data = _secret_data(secret)
    plain = dict(line.split(":", 1) for line in data["passwd.plain"].splitlines())
    assert plain["aggregator"] == data["mqtt-password"]
    for agent in ("agent-1", "agent-2", "agent-3"):
        assert plain[agent] == data[f"agent-{agent}-password"] and len(plain[agent]) >= 16

    [statefulset] = kinds["StatefulSet"]
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    assert services[f"{RELEASE}-edgetune-aggregator"]["spec"]["ports"][0]["port"] == 9100
    assert services[f"{RELEASE}-edgetune-mosquitto"]["spec"]["ports"][0]["port"] == 1883


def test_the_aggregator_is_a_job_per_run(chart, helm):
    """The aggregator exits 0 after its last round: a Job (restarted only on failure), one per
    run, each with its own output dir; the metrics Service still selects its pod."""
    kinds = by_kind(manifests(render(chart, {})))
    assert "Deployment" not in kinds
    [job] = kinds["Job"]
    assert job["apiVersion"] == "batch/v1"
    assert job["metadata"]["name"] == f"{RELEASE}-edgetune-aggregator-run1"
    assert job["spec"]["backoffLimit"] == 6 and "ttlSecondsAfterFinished" not in job["spec"]
    template = job["spec"]["template"]
    assert template["spec"]["restartPolicy"] == "OnFailure"
    [service] = [s for s in kinds["Service"] if s["metadata"]["name"].endswith("-aggregator")]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    # nothing in the (immutable) pod template changes with the chart's version
    assert "helm.sh/chart" not in template["metadata"]["labels"]
    assert "app.kubernetes.io/version" not in template["metadata"]["labels"]
    assert "annotations" not in template["metadata"]

    def output_dir(j):
        [c] = j["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in c["env"]}["EDGETUNE_OUTPUT_DIR"]

    [job2] = by_kind(manifests(render(chart, {"aggregator": {"run": "run2", "ttlSecondsAfterFinished": 3600}})))["Job"]
    assert job2["metadata"]["name"] == f"{RELEASE}-edgetune-aggregator-run2"
    assert output_dir(job) == "/var/lib/edgetune/checkpoints/run1"
    assert output_dir(job2) == "/var/lib/edgetune/checkpoints/run2"
    assert job2["spec"]["ttlSecondsAfterFinished"] == 3600
    for bad in ("Run_2", "-run", "r" * 21, "../run1", 2):
        with pytest.raises(helm.HelmError, match="/aggregator/run"):  # values.schema.json
            render(chart, {"aggregator": {"run": bad}})
    with pytest.raises(helm.HelmError, match="longer than 63"):
        render(chart, {"fullnameOverride": "f" * 40, "aggregator": {"run": "r" * 20}})


def test_hardened(chart, helm):
    """NetworkPolicies, the broker's PodDisruptionBudget, the ServiceAccount and a model folder
    mounted into the aggregator (extraVolumes/extraVolumeMounts/extraEnv)."""
    kinds = by_kind(manifests(render(chart, SCENARIOS["hardened"])))
    [job] = kinds["Job"]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert {"name": "EDGETUNE_MODEL", "value": "/models/qwen"} in container["env"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod["volumes"]
    [sa] = kinds["ServiceAccount"]
    assert sa["metadata"]["name"] == pod["serviceAccountName"] == "edgetune-trainer"
    assert sa["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": "t@p.iam"}
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False

    [pdb] = kinds["PodDisruptionBudget"]
    [sts] = kinds["StatefulSet"]
    assert pdb["spec"]["maxUnavailable"] == 0
    assert pdb["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()

    policies = {p["metadata"]["name"]: p["spec"] for p in kinds["NetworkPolicy"]}
    broker = policies[f"{RELEASE}-edgetune-mosquitto"]
    aggregator = policies[f"{RELEASE}-edgetune-aggregator"]
    agg_labels = job["spec"]["template"]["metadata"]["labels"]
    assert broker["podSelector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert aggregator["podSelector"]["matchLabels"].items() <= agg_labels.items()
    # MQTT from the aggregator and the devices' network, nothing else
    [mqtt] = broker["ingress"]
    assert mqtt["ports"] == [{"port": "mqtt", "protocol": "TCP"}]
    assert mqtt["from"][0]["podSelector"]["matchLabels"].items() <= agg_labels.items()
    assert mqtt["from"][1:] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    # metrics from the monitoring namespace; out to DNS, the broker and the extra rule
    [metrics] = aggregator["ingress"]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] == SCENARIOS["hardened"]["networkPolicy"]["metricsFrom"]
    dns, to_broker, extra = aggregator["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    broker_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert to_broker["to"][0]["podSelector"]["matchLabels"].items() <= broker_labels.items()
    assert to_broker["ports"] == [{"port": 1883, "protocol": "TCP"}]
    assert extra == SCENARIOS["hardened"]["networkPolicy"]["aggregatorEgress"][0]

    # off by default; with no mqttFrom the broker takes MQTT from anyone (devices outside the cluster)
    defaults = by_kind(manifests(render(chart, {})))
    assert "NetworkPolicy" not in defaults and "PodDisruptionBudget" not in defaults
    [open_policy] = [p for p in by_kind(manifests(render(chart, {"networkPolicy": {"enabled": True}})))["NetworkPolicy"]
                     if p["metadata"]["name"].endswith("-mosquitto")]
    assert "from" not in open_policy["spec"]["ingress"][0]
    # an external broker: no broker policy, and the aggregator's way out must be given
    ext = by_kind(manifests(render(chart, SCENARIOS["network-policy-external-broker"])))
    assert [p["metadata"]["name"] for p in ext["NetworkPolicy"]] == [f"{RELEASE}-edgetune-aggregator"]
    assert "ServiceAccount" not in ext
    assert ext["Job"][0]["spec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"
    with pytest.raises(helm.HelmError, match="networkPolicy.aggregatorEgress"):
        render(chart, {**SCENARIOS["external-broker"], "networkPolicy": {"enabled": True}})


def test_mosquitto_config_matches_compose(chart):
    """The chart's Mosquitto settings and ACL are those of deploy/mosquitto/ (the compose demo)."""
    kinds = by_kind(manifests(render(chart, {})))
    [cm] = [c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-mosquitto")]
    chart_conf = config_lines(cm["data"]["mosquitto.conf"])
    compose_conf = config_lines((MOSQUITTO_DIR / "mosquitto.conf").read_text())
    assert chart_conf == compose_conf
    for setting in ("max_packet_size 4194304", "set_tcp_nodelay true", "persistence true", "allow_anonymous false",
                    "max_queued_messages 4000", "password_file /mosquitto/auth/passwd", "acl_file /mosquitto/auth/acl"):
        assert setting in chart_conf
    assert config_lines(cm["data"]["acl"]) == config_lines((MOSQUITTO_DIR / "acl").read_text())


NOTES = "edgetune/templates/NOTES.txt"


def _mosquitto_conf(kinds) -> list[str]:
    [cm] = [c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-mosquitto")]
    return config_lines(cm["data"]["mosquitto.conf"])


@pytest.mark.parametrize(("scenario", "secret", "mutual"), [
    ("tls-cert-manager", f"{RELEASE}-edgetune-mosquitto-tls", False),
    ("tls-existing-secret", "fleet-broker-tls", False),
    ("tls-mutual", "fleet-broker-tls", True),
    ("tls-mutual-cert-manager", f"{RELEASE}-edgetune-mosquitto-tls", True),
    ("tls-mutual-existing-secret", "fleet-broker-tls", True),
])
def test_tls(chart, scenario, secret, mutual):
    """broker.tls: Mosquitto's TLS listener with the certificate Secret mounted (and
    require_certificate for mutual TLS), the broker's Service carrying mqtts only, and the
    aggregator on mqtts:// with the CA (and, for mutual TLS, its client certificate: cert-manager's
    from the broker's issuer, or aggregator.tls.existingSecret), or, with keepPlainListener, on the
    plain listener of a cluster-internal Service; devices are told to use mqtts:// (and a client
    certificate of their own)."""
    rendered = render(chart, SCENARIOS[scenario])
    kinds = by_kind(manifests(rendered))
    plain = SCENARIOS[scenario]["broker"]["tls"].get("keepPlainListener", False)
    broker = f"{RELEASE}-edgetune-mosquitto"

    conf = _mosquitto_conf(kinds)
    tls_listener = ["listener 8883", "protocol mqtt", "cafile /mosquitto/tls/ca.crt", "certfile /mosquitto/tls/tls.crt",
                    "keyfile /mosquitto/tls/tls.key", "tls_version tlsv1.2", f"require_certificate {str(mutual).lower()}"]
    plain_listener = ["listener 1883", "protocol mqtt"] if plain else []
    assert conf[conf.index(next(x for x in conf if x.startswith("listener "))):] == plain_listener + tls_listener

    [sts] = kinds["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    [mosquitto] = pod["containers"]
    assert [p["name"] for p in mosquitto["ports"]] == (["mqtt"] if plain else []) + ["mqtts"]
    assert mosquitto["readinessProbe"]["tcpSocket"]["port"] == ("mqtt" if plain else "mqtts")
    assert {"name": "tls", "mountPath": "/mosquitto/tls", "readOnly": True} in mosquitto["volumeMounts"]
    [tls_volume] = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert tls_volume["secret"]["secretName"] == secret
    assert {i["key"] for i in tls_volume["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}

    services = {s["metadata"]["name"]: s["spec"] for s in kinds["Service"]}
    assert services[broker]["ports"] == [{"name": "mqtts", "port": 8883, "targetPort": "mqtts", "protocol": "TCP"}]
    if plain:  # plain MQTT on a ClusterIP only, whatever mosquitto.service.type
        assert services[broker]["type"] == "NodePort"
        internal = services[f"{broker}-internal"]
        assert internal["type"] == "ClusterIP" and internal["selector"] == services[broker]["selector"]
        assert internal["ports"] == [{"name": "mqtt", "port": 1883, "targetPort": "mqtt", "protocol": "TCP"}]
    else:
        assert f"{broker}-internal" not in services

    [job] = kinds["Job"]
    job_pod = job["spec"]["template"]["spec"]
    settings = _settings(kinds)
    if plain:
        assert settings["EDGETUNE_BROKER_URL"] == f"mqtt://{broker}-internal:1883"
        assert "EDGETUNE_CA_FILE" not in settings
        assert not [v for v in job_pod["volumes"] if v["name"] == "broker-ca"]
    else:
        assert settings["EDGETUNE_BROKER_URL"] == f"mqtts://{broker}:8883"
        [ca] = [v for v in job_pod["volumes"] if v["name"] == "broker-ca"]
        assert ca["secret"]["secretName"] == secret
        [mount] = [m for m in job_pod["containers"][0]["volumeMounts"] if m["name"] == "broker-ca"]
        assert settings["EDGETUNE_CA_FILE"] == f"{mount['mountPath']}/{ca['secret']['items'][0]['path']}"
        assert ca["secret"]["items"][0]["key"] == "ca.crt"
    client_secret = SCENARIOS[scenario].get("aggregator", {}).get("tls", {}).get(
        "existingSecret", f"{RELEASE}-edgetune-aggregator-tls")
    _assert_mounted(job_pod, "client-tls", client_secret if mutual and not plain else None,
                    {"EDGETUNE_CERT_FILE": "tls.crt", "EDGETUNE_KEY_FILE": "tls.key"})

    if "NetworkPolicy" in kinds:
        policies = {p["metadata"]["name"]: p["spec"] for p in kinds["NetworkPolicy"]}
        ingress = policies[broker]["ingress"]
        assert ingress[0]["ports"] == [{"port": "mqtts", "protocol": "TCP"}]
        if plain:  # the plain listener takes the aggregator only
            assert ingress[1]["ports"] == [{"port": "mqtt", "protocol": "TCP"}]
            assert [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in ingress[1]["from"]] == [
                "aggregator"]
        _, to_broker = policies[f"{RELEASE}-edgetune-aggregator"]["egress"]
        assert to_broker["ports"] == [{"port": 1883 if plain else 8883, "protocol": "TCP"}]

    certs = {c["metadata"]["name"]: c["spec"] for c in kinds.get("Certificate", [])}
    if scenario == "tls-cert-manager":
        assert list(certs) == [secret]
        spec = certs[secret]
        assert spec["secretName"] == secret
        assert spec["issuerRef"] == {"name": "fleet-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        assert spec["dnsNames"] == [broker, f"{broker}.{NAMESPACE}", f"{broker}.{NAMESPACE}.svc",
                                    f"{broker}.{NAMESPACE}.svc.cluster.local", "mqtt.example.com"]
        assert spec["ipAddresses"] == ["203.0.113.9"] and "server auth" in spec["usages"]
    elif scenario == "tls-mutual-cert-manager":
        # the aggregator's from the broker's issuer, named after its broker login
        assert sorted(certs) == sorted([secret, client_secret])
        client = certs[client_secret]
        assert client["secretName"] == client_secret and client["issuerRef"] == certs[secret]["issuerRef"]
        assert client["commonName"] == "aggregator" and "dnsNames" not in client
        assert client["usages"] == ["client auth", "digital signature"] and client["duration"] == "2160h"
    else:
        assert not certs

    notes = rendered[NOTES]
    assert "EDGETUNE_BROKER_URL=mqtts://<broker address>:8883  EDGETUNE_CA_FILE=" in notes
    assert f"get secret {secret} -o jsonpath='{{.data.ca\\.crt}}'" in notes
    assert "WARNING" not in notes and "mqtt://<broker address>" not in notes
    assert ("Mutual TLS" in notes) is mutual
    # devices present a certificate of their own from the same CA
    assert ("EDGETUNE_CERT_FILE=" in notes and "edgetune provision device" in notes) is mutual


def _assert_mounted(pod, volume: str, secret: str | None, files: dict[str, str]) -> None:
    """The aggregator pod mounts `secret` read-only as `volume`, and each env variable in `files`
    names the file of that Secret key; secret None: neither the volume nor the variables."""
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    if secret is None:
        assert not [v for v in pod["volumes"] if v["name"] == volume]
        assert not [m for m in container["volumeMounts"] if m["name"] == volume]
        assert not set(files) & set(env)
        return
    [vol] = [v for v in pod["volumes"] if v["name"] == volume]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume]
    assert vol["secret"]["secretName"] == secret and mount["readOnly"] is True
    assert vol["secret"]["defaultMode"] == 0o440  # the group's (fsGroup) only
    paths = {i["key"]: f"{mount['mountPath']}/{i['path']}" for i in vol["secret"]["items"]}
    assert {name: paths[key] for name, key in files.items()} == {name: env[name] for name in files}
    assert len(set(paths.values())) == len(paths) == len(files)


def test_signing_and_published_models(chart):
    """aggregator.signing.existingSecret: signing.key and fleet-keys.pem mounted read-only as
    EDGETUNE_SIGNING_KEY and EDGETUNE_FLEET_KEYS, and NOTES tells devices to take the fleet's
    keys; aggregator.publishModel is EDGETUNE_PUBLISH_MODEL (a bare YAML `off`, false, is off)."""
    files = {"EDGETUNE_SIGNING_KEY": "signing.key", "EDGETUNE_FLEET_KEYS": "fleet-keys.pem"}
    rendered = render(chart, SCENARIOS["tls-mutual-existing-secret"])
    kinds = by_kind(manifests(rendered))
    _assert_mounted(kinds["Job"][0]["spec"]["template"]["spec"], "signing", "fleet-signing", files)
    assert _settings(kinds)["EDGETUNE_PUBLISH_MODEL"] == "final"
    notes = rendered[NOTES]
    assert "EDGETUNE_FLEET_KEYS=/etc/edgetune/fleet-keys.pem" in notes and "fleet-keys.pem, as" in notes
    assert "signed int8 ONNX model on the fleet's model topic after the last round" in notes

    for values in ({}, {"aggregator": {"publishModel": False}}):
        rendered = render(chart, values)
        kinds = by_kind(manifests(rendered))
        _assert_mounted(kinds["Job"][0]["spec"]["template"]["spec"], "signing", None, files)
        assert _settings(kinds)["EDGETUNE_PUBLISH_MODEL"] == "off"
        assert "EDGETUNE_FLEET_KEYS" not in rendered[NOTES] and "ONNX" not in rendered[NOTES]


def test_tls_refuses_what_cannot_work(chart, helm):
    tls = {"enabled": True, "existingSecret": "fleet-broker-tls"}
    for values, why in (
        ({"enabled": True}, "needs the broker's certificate: set broker.tls.certManager.issuerRef"),
        ({**tls, "certManager": {"issuerRef": {"name": "fleet-ca"}}}, "either as broker.tls.existingSecret or"),
        # mutual TLS with neither cert-manager nor the aggregator's own certificate
        ({**tls, "requireClientCertificate": True}, "the aggregator connects to the mutual-TLS listener and needs"),
        ({"requireClientCertificate": True}, "requireClientCertificate needs broker.tls.enabled"),
        ({**tls, "keepPlainListener": True, "port": 1883}, "the same port"),
    ):
        with pytest.raises(helm.HelmError, match=re.escape(why)):
            render(chart, {"broker": {"tls": values}})
    with pytest.raises(helm.HelmError, match="with an external broker give externalBroker.url as mqtts://"):
        render(chart, {**SCENARIOS["external-broker"], "broker": {"tls": tls}})
    # a client certificate on a plain connection (ConnectionSettings would refuse it at start)
    client = {"aggregator": {"tls": {"existingSecret": "fleet-aggregator-tls"}}}
    for values, why in (
        ({**SCENARIOS["tls-mutual"], **client}, "with broker.tls.keepPlainListener it uses the plain listener"),
        (client, "enable broker.tls (or give an mqtts:// externalBroker.url)"),
        ({**client, "mosquitto": {"enabled": False}, "externalBroker": {"url": "mqtt://mqtt.example.com:1883"}},
         "connects without TLS (mqtt://mqtt.example.com:1883)"),
        # models for serving devices: signed, and from the federated mode
        ({"aggregator": {"publishModel": "every"}}, "take only signed models: give the fleet's signing key"),
        ({"aggregator": {"publishModel": "final", "signing": {"existingSecret": "s"},
                         "extraSettings": {"EDGETUNE_MODE": "split"}}}, "only the federated mode publishes"),
        # settings the chart sets from its own values
        ({"aggregator": {"extraSettings": {"EDGETUNE_PUBLISH_MODEL": "final"}}}, "use aggregator.publishModel"),
        ({**SCENARIOS["tls-mutual-existing-secret"], "aggregator": {
            **SCENARIOS["tls-mutual-existing-secret"]["aggregator"], "extraSettings": {"EDGETUNE_KEY_FILE": "/k"}}},
         "the chart sets EDGETUNE_KEY_FILE itself: use aggregator.tls"),
    ):
        with pytest.raises(helm.HelmError, match=re.escape(why)):
            render(chart, values)
    # an external broker that requires a client certificate gets the aggregator's over mqtts://
    pod = by_kind(manifests(render(chart, {**SCENARIOS["external-broker"], **client})))["Job"][0]["spec"]["template"]
    _assert_mounted(pod["spec"], "client-tls", "fleet-aggregator-tls",
                    {"EDGETUNE_CERT_FILE": "tls.crt", "EDGETUNE_KEY_FILE": "tls.key"})


def test_notes_warn_of_plain_mqtt_outside_the_cluster(chart):
    """A LoadBalancer or NodePort without broker.tls hands the devices' passwords to the network:
    NOTES says so, and how to turn TLS on."""
    for service, warned in (("LoadBalancer", True), ("NodePort", True), ("ClusterIP", False)):
        notes = render(chart, {"mosquitto": {"service": {"type": service}}})[NOTES]
        assert ("WARNING: the %s exposes plain MQTT" % service in notes) is warned, notes
        assert "EDGETUNE_BROKER_URL=mqtt://<broker address>:1883" in notes


def test_the_packet_limit_is_one_value(chart, helm):
    """maxPacketBytes is Mosquitto's max_packet_size and the aggregator's EDGETUNE_MAX_PACKET_BYTES
    (the transport chunks above it); its default is the wire's."""
    from broker.transport import DEFAULT_MAX_PACKET_BYTES

    for values, expected in (({}, DEFAULT_MAX_PACKET_BYTES), ({"maxPacketBytes": 2097152}, 2097152)):
        kinds = by_kind(manifests(render(chart, values)))
        [cm] = [c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-mosquitto")]
        assert f"max_packet_size {expected}" in config_lines(cm["data"]["mosquitto.conf"])
        assert _settings(kinds)["EDGETUNE_MAX_PACKET_BYTES"] == str(expected)
    # with an external broker the aggregator still gets it (that broker's limit)
    kinds = by_kind(manifests(render(chart, {**SCENARIOS["external-broker"], "maxPacketBytes": 1048576})))
    assert _settings(kinds)["EDGETUNE_MAX_PACKET_BYTES"] == "1048576"
    # the value's old name would silently set only the broker: the chart says where it went
    with pytest.raises(helm.HelmError, match="maxPacketBytes"):
        render(chart, {"mosquitto": {"maxPacketSize": 2097152}})


def test_service_monitor(chart):
    kinds = by_kind(manifests(render(chart, SCENARIOS["service-monitor"])))
    [sm] = kinds["ServiceMonitor"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [service] = [s for s in kinds["Service"] if s["metadata"]["name"].endswith("-aggregator")]
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "the ServiceMonitor does not select the Service"
    assert sm["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert "ServiceMonitor" not in by_kind(manifests(render(chart, {})))


def test_secrets_are_stable(chart, helm):
    """The passwords come from values, so that two offline renders (a GitOps sync) give the
    same Secret; without them and without an existing Secret the render fails, saying what to set."""
    first, second = (by_kind(manifests(render(chart, {})))["Secret"] for _ in range(2))
    assert first == second
    [secret] = first
    assert _secret_data(secret)["mqtt-password"] == PASSWORDS["broker"]["password"]
    assert _secret_data(secret)["agent-agent-2-password"] == "agent-2-password-0123456789"
    with pytest.raises(helm.HelmError, match=r"the aggregator has no password: set broker\.password .*existingSecret"):
        render(chart, {}, base=False)
    agents_without = with_passwords({})
    agents_without["mosquitto"]["agents"][1]["password"] = ""
    with pytest.raises(helm.HelmError, match=r'agent "agent-2" has no password: set mosquitto\.agents\[1\]\.password'):
        render(chart, agents_without, base=False)
    # an existing Secret needs no password in values
    kinds = by_kind(manifests(render(chart, {"broker": {"existingSecret": "fleet-credentials"}}, base=False)))
    assert "Secret" not in kinds
    for template in (CHART / "templates").iterdir():
        assert not re.search(r"\blookup\s|randAlpha|randAscii|genPrivateKey", template.read_text()), template.name


def test_external_broker(chart, helm):
    kinds = by_kind(manifests(render(chart, SCENARIOS["external-broker"])))
    assert "StatefulSet" not in kinds
    assert not [c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-mosquitto")]
    assert all(not s["metadata"]["name"].endswith("-mosquitto") for s in kinds["Service"])
    assert _settings(kinds)["EDGETUNE_BROKER_URL"] == "mqtts://mqtt.example.com:8883"
    assert set(kinds["Secret"][0]["data"]) == {"mqtt-username", "mqtt-password"}
    # no broker at all is a mistake the chart names
    with pytest.raises(helm.HelmError, match="externalBroker.url"):
        render(chart, {"mosquitto": {"enabled": False}})


def test_persistence_off(chart):
    kinds = by_kind(manifests(render(chart, SCENARIOS["persistence-off"])))
    assert "PersistentVolumeClaim" not in kinds
    pod = kinds["Job"][0]["spec"]["template"]["spec"]
    [checkpoints] = [v for v in pod["volumes"] if v["name"] == "checkpoints"]
    assert checkpoints == {"name": "checkpoints", "emptyDir": {}}
    assert "volumeClaimTemplates" not in kinds["StatefulSet"][0]["spec"]


def test_existing_secret_and_claim(chart):
    kinds = by_kind(manifests(render(chart, SCENARIOS["existing-secret-and-claim"])))
    assert "Secret" not in kinds and "PersistentVolumeClaim" not in kinds
    pod = kinds["Job"][0]["spec"]["template"]["spec"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "my-checkpoints"}} in pod["volumes"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in pod["containers"][0]["env"] if "valueFrom" in e}
    assert refs == {"my-broker-credentials"}


def test_grafana_dashboard(chart):
    kinds = by_kind(manifests(render(chart, SCENARIOS["grafana-dashboard"])))
    [cm] = [c for c in kinds["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "EdgeTune"}
    # the chart ships the one dashboard file, unchanged
    assert json.loads(cm["data"]["edgetune.json"]) == json.loads(DASHBOARD.read_text())
    other = by_kind(manifests(render(chart, SCENARIOS["everything"])))
    [cm] = [c for c in other["ConfigMap"] if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["namespace"] == "monitoring"


@pytest.mark.parametrize(("values", "where", "why"), [
    ({"aggregator": {"metricsPort": "9100"}}, "/aggregator/metricsPort", "want integer"),
    ({"mosquitto": {"service": {"type": "Ingress"}}}, "/mosquitto/service/type", "must be one of"),
    ({"aggregator": {"image": {"pullPolicy": "always"}}}, "/aggregator/image/pullPolicy", "must be one of"),
    ({"serviceMonitor": {"enabeld": True}}, "/serviceMonitor", "'enabeld' not allowed"),
    ({"persistence": {"enabled": "yes"}}, "/persistence/enabled", "want boolean"),
    ({"fleet": "a/b"}, "/fleet", "does not match pattern"),
    ({"aggregator": {"extraVolumeMounts": [{"name": "models"}]}}, "/aggregator/extraVolumeMounts/0", "mountPath"),
    ({"broker": {"tls": {"enabled": "yes"}}}, "/broker/tls/enabled", "want boolean"),
    ({"broker": {"tls": {"certManager": {"issuerRef": {"nmae": "ca"}}}}}, "/broker/tls/certManager/issuerRef",
     "'nmae' not allowed"),
    ({"aggregator": {"publishModel": "always"}}, "/aggregator/publishModel", "must be one of"),
    ({"aggregator": {"signing": {"secret": "fleet-signing"}}}, "/aggregator/signing", "'secret' not allowed"),
])
def test_values_schema_refuses_wrong_values(chart, helm, values, where, why):
    """values.schema.json: Helm refuses a value of the wrong type, an unknown choice or a
    misspelt key before rendering anything, saying where."""
    with pytest.raises(helm.HelmError, match="don't meet the specifications of the schema") as e:
        render(chart, values)
    assert where in str(e.value) and why in str(e.value), str(e.value)


def test_values_yaml_meets_its_schema():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = load_yaml((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    # every key of values.yaml is in the schema (which refuses unknown keys)
    assert schema["additionalProperties"] is False and set(values) <= set(schema["properties"])


def test_bad_values_are_refused_with_a_reason(chart, helm):
    with pytest.raises(helm.HelmError, match="not a valid agent id"):
        render(chart, {"mosquitto": {"agents": [{"username": "kiosk/17", "password": ""}]}})
    with pytest.raises(helm.HelmError, match="not an EdgeTune setting"):
        render(chart, {"aggregator": {"extraSettings": {"ROUNDS": "3"}}})


def _values_keys(text: str):
    """(line number, indent, key, has a value on the line, comment right above, that comment is
    a helm-docs "# --" one) of every mapping key in values.yaml; keys inside list items count as
    children of the list's key."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_.\-/\"]+):(\s*(.*))?$", line)
        if not m:
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        commented = j >= 0 and lines[j].strip().startswith("#")
        # a helm-docs comment ("# -- ...") documents the key's whole value
        while j > 0 and lines[j - 1].strip().startswith("#"):
            j -= 1
        documents_value = commented and lines[j].strip().startswith("# --")
        value = (m.group(4) or "").split("#")[0].strip()
        out.append((i + 1, len(m.group(1)), m.group(2), bool(value), commented, documents_value))
    return out


def test_every_values_key_is_commented():
    """prometheus-community style: every key of values.yaml says what it does. A key without a
    comment is fine only as a plain parent whose own keys are all commented; what lies under a
    key with a helm-docs comment ("# -- ...", e.g. resources:) is that key's value."""
    keys = _values_keys((CHART / "values.yaml").read_text())
    missing = []
    for n, (line, indent, key, has_value, commented, _) in enumerate(keys):
        if commented:
            continue
        # inside the value of a "# --" documented ancestor
        want, covered = indent, False
        for prev in reversed(keys[:n]):
            if prev[1] < want:
                covered = covered or prev[5]
                want = prev[1]
        if covered:
            continue
        has_children = n + 1 < len(keys) and keys[n + 1][1] > indent
        if has_value or not has_children:
            missing.append(f"line {line}: {key}")
    assert not missing, "values.yaml keys without a comment: " + ", ".join(missing)


def test_chart_packages(helm, tmp_path):
    """helm package works (no symlinks or files outside the chart), and the package holds the dashboard."""
    archive = helm.package(str(CHART), destination=str(tmp_path))
    with helm.Chart.load(archive) as packaged:
        files = {f["name"] for f in packaged.files}
        assert "dashboards/edgetune.json" in files
