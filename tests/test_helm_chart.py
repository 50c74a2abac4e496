"""The Helm chart, rendered by Helm's own engine (helm-python-sdk embeds Helm's Go SDK, offline).

Every manifest of every values set is validated against the Kubernetes OpenAPI schemas of pinned
versions (kubernetes-validate, strict: unknown fields are errors); the Prometheus Operator kinds,
which those schemas lack, against the fields of their CRDs below. The rendered pod is handed to
`crawlwarden run`'s own argument parser, and started as real gateway processes with its volumes
laid out as the kubelet would, to show that it starts and presents the chart's CA.
"""

from __future__ import annotations

import base64
import http.client
import inspect
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from proxy.admin import ROUTES
from proxy.audit.log import FetchLog
from proxy.cli import build_parser
from proxy.cli import parse_args
from proxy.policy import parse_policy
from proxy.runtime import Settings
from tests.support import CRAWLWARDEN
from tests.support import PROJECT
from tests.support import TEAM
from tests.support import TEAM_TOKEN
from tests.support import LocalCA
from tests.support import Site
from tests.support import curl
from tests.support import free_port
from tests.support import policy_with

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "crawlwarden"
DASHBOARDS = ROOT / "dashboards"
RELEASE = "cw"
NAMESPACE = "crawl"
FULLNAME = "cw-crawlwarden"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ("1.27.0", "1.34.0")
# Kinds that are CRDs of the Prometheus Operator: validated against CRD_SCHEMAS instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

SIGNING_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIDOm3xtDnTnJ1yxaV6/TRyNcLpXBGp0GRQSp9Wr0xaPu\n"
    "-----END PRIVATE KEY-----\n"
)
KEY_PATH = "/var/run/secrets/crawlwarden/audit.key"
# What the gateway waits for the fetch log's store after its drain, at most (SIGTERM).
FLUSH_SECONDS = inspect.signature(FetchLog.close).parameters["timeout"].default


# -- rendering -------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of duplicate keys; the API server rejects them. So do we."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    if dupes:
        raise AssertionError(f"duplicate keys {dupes} at line {node.start_mark.line + 1}")
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def render(values: dict[str, Any], chart: Path = CHART) -> list[dict[str, Any]]:
    """The chart's objects for these values, as `helm install cw -n crawl` would create them."""
    with helm.Chart.load(chart) as loaded:
        files = loaded.render(values, name=RELEASE, namespace=NAMESPACE)
    objects = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(text, Loader=_StrictLoader):
            if doc is not None:
                objects.append(doc)
    return objects


def notes(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as loaded:
        files = loaded.render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def render_error(values: dict[str, Any], chart: Path = CHART) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render(values, chart)
    return str(caught.value)


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"].get("name"))]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {kinds(objects)}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> Counter[str]:
    return Counter(o["kind"] for o in objects)


def workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    gateways = [o for o in found if o["metadata"]["name"] == FULLNAME]
    assert len(gateways) == 1
    return gateways[0]


def gateway_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = workload(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "gateway")


def secret_data(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    data = one(objects, "Secret", name)["data"]
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


# -- values sets -----------------------------------------------------------------------------


def policy_text(**changes: Any) -> str:
    """A policy whose tokens come from the environment, as the chart's Secrets provide them."""
    policy = policy_with(
        teams=[{"name": TEAM, "token_env": "VISION_DATA_TOKEN", "projects": [PROJECT]}],
        admin_tokens=[
            {"role": "admin", "token_env": "ADMIN_TOKEN"},
            {"role": "auditor", "token_env": "AUDITOR_TOKEN"},
        ],
        **changes,
    )
    return yaml.safe_dump(policy, sort_keys=False)


TOKENS = {
    "teamTokens": {"tokens": {"VISION_DATA_TOKEN": TEAM_TOKEN}},
    "adminTokens": {
        "tokens": {
            "ADMIN_TOKEN": "admin-secret-token",
            "AUDITOR_TOKEN": "auditor-secret-token",
        }
    },
}

HA: dict[str, Any] = {
    **TOKENS,
    "replicaCount": 3,
    "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1},
    "policy": policy_text(audit={"signing_key_file": KEY_PATH}),
    "redis": {"url": "redis://:pw@redis.data.svc:6379/0"},
    "audit": {"dsn": "postgresql://crawlwarden:pw@pg.data.svc:5432/crawlwarden"},
    "signingKey": {"privateKey": SIGNING_KEY},
    "mitmCA": {"publish": {"namespaces": ["scrapers-a", "scrapers-b"]}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "additionalLabels": {"release": "prom"}},
        "prometheusRule": {"enabled": True},
    },
    "dashboards": {"enabled": True, "annotations": {"grafana_folder": "crawlwarden"}},
    "networkPolicy": {
        "enabled": True,
        "scraperNamespaces": {"names": ["scrapers-a"], "matchLabels": {"crawl": "yes"}},
        "admin": {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ]
        },
    },
    "egressLockdown": {"enabled": True, "namespaces": ["scrapers-a", "scrapers-b"]},
}

EXISTING: dict[str, Any] = {
    "replicaCount": 2,
    "persistence": {"enabled": True, "storageClassName": "fast", "size": "10Gi"},
    "existingPolicyConfigMap": "crawl-policy",
    "existingPolicyConfigMapKey": "crawlwarden.yaml",
    "teamTokens": {"existingSecret": "crawl-team-tokens"},
    "adminTokens": {"existingSecret": "crawl-admin-tokens"},
    "redis": {"existingSecret": "crawl-redis", "existingSecretKey": "url"},
    "audit": {"existingSecret": "crawl-pg", "existingSecretKey": "uri"},
    "signingKey": {"existingSecret": "crawl-signing", "existingSecretKey": "ed25519.pem"},
    "mitmCA": {"existingSecret": "crawl-ca", "generate": False},
    "upstreamTrustedCA": {"configMap": "corp-roots", "key": "roots.pem"},
}

INTERNAL_REDIS: dict[str, Any] = {
    **TOKENS,
    "policy": policy_text(),
    "redis": {"internal": {"enabled": True}},
    "networkPolicy": {"enabled": True, "scraperNamespaces": {"names": ["scrapers"]}},
}

# /metrics closed: the policy has a token of role metrics, which the ServiceMonitor sends.
METRICS_CLOSED: dict[str, Any] = {
    **HA,
    "policy": yaml.safe_dump(
        policy_with(
            teams=[{"name": TEAM, "token_env": "VISION_DATA_TOKEN", "projects": [PROJECT]}],
            admin_tokens=[
                {"role": "admin", "token_env": "ADMIN_TOKEN"},
                {"role": "metrics", "token_env": "METRICS_TOKEN", "name": "prometheus"},
            ],
            audit={"signing_key_file": KEY_PATH},
        ),
        sort_keys=False,
    ),
    "adminTokens": {"tokens": {"ADMIN_TOKEN": "admin-secret-token", "METRICS_TOKEN": "m-token"}},
    "metrics": {
        "serviceMonitor": {"enabled": True, "tokenEnv": "METRICS_TOKEN"},
        "prometheusRule": {"enabled": True},
    },
}

VALUE_SETS = {
    "default": {},
    "ha": HA,
    "existing": EXISTING,
    "internal-redis": INTERNAL_REDIS,
    "metrics-closed": METRICS_CLOSED,
}


@pytest.fixture(scope="module")
def chart_with_dashboards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chart with two dashboards and a rule file, as helm/sync-dashboards.sh leaves it."""
    chart = tmp_path_factory.mktemp("chart") / "crawlwarden"
    shutil.copytree(CHART, chart)
    # The real chart carries the real dashboards now; the samples replace them entirely.
    shutil.rmtree(chart / "dashboards", ignore_errors=True)
    write_sample_dashboards(chart / "dashboards")
    return chart


SAMPLE_DASHBOARD = json.dumps(
    {"title": "crawlwarden — sites", "panels": [{"expr": 'rate(x{site!="_other"}[5m]) > 0'}]},
    ensure_ascii=False,
    indent=2,
)
SAMPLE_ALERTS = """\
# Alert rules (a Prometheus rule file).
groups:
  - name: crawlwarden
    rules:
      - alert: CrawlwardenFetchLogBacklog
        expr: crawlwarden_audit_queue_depth > 1000
        for: 5m
        labels: {severity: warning}
        annotations:
          summary: "Fetch records wait for the store: {{ $value }} queued"
      - record: crawlwarden:requests:rate5m
        expr: sum by (site) (rate(crawlwarden_requests_total[5m]))
"""


def write_sample_dashboards(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sites.json").write_text(SAMPLE_DASHBOARD + "\n", encoding="utf-8")
    (directory / "Fetch_Log.json").write_text('{"title": "fetch log"}\n', encoding="utf-8")
    (directory / "alerts.yaml").write_text(SAMPLE_ALERTS, encoding="utf-8")


def chart_for(name: str, chart_with_dashboards: Path) -> Path:
    return chart_with_dashboards if name == "ha" else CHART


# -- schemas of the Prometheus Operator kinds ------------------------------------------------

_DURATION = {
    "type": "string",
    "pattern": r"^(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)$",
}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
    "additionalProperties": False,
}
# The fields of monitoring.coreos.com/v1 that the chart may set, typed as the CRDs type them.
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": _LABELS},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                # SafeAuthorization: credentials is a SecretKeySelector
                                "authorization": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "type": {"type": "string"},
                                        "credentials": {
                                            "type": "object",
                                            "required": ["key"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "key": {"type": "string"},
                                                "name": {"type": "string"},
                                                "optional": {"type": "boolean"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _META,
            "spec": {
                "type": "object",
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
                                "interval": _DURATION,
                                "limit": {"type": "integer"},
                                "query_offset": _DURATION,
                                "partial_response_strategy": {"type": "string"},
                                "labels": _LABELS,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "oneOf": [
                                            {"required": ["alert"]},
                                            {"required": ["record"]},
                                        ],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def validate(obj: dict[str, Any]) -> None:
    if obj["kind"] in CRD_KINDS:
        jsonschema.Draft202012Validator(CRD_SCHEMAS[obj["kind"]]).validate(obj)
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


# -- every manifest is valid -----------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(name: str, chart_with_dashboards: Path):
    objects = render(VALUE_SETS[name], chart_for(name, chart_with_dashboards))
    assert objects
    for obj in objects:
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as e:
            where = "/".join(map(str, e.absolute_path))
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {where}: {e.message}")
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == RELEASE, obj["metadata"]["name"]
        assert "namespace" in obj["metadata"], f"{obj['kind']} without a namespace"


def test_objects_of_the_default_values():
    objects = render({})
    assert kinds(objects) == {
        "ServiceAccount": 1,
        "ConfigMap": 1,  # the policy
        "Secret": 1,  # the generated CA
        "Service": 1,
        "Deployment": 1,
    }
    assert workload(objects)["spec"]["replicas"] == 1
    # The starter policy is valid and admits no scraper.
    policy = one(objects, "ConfigMap", f"{FULLNAME}-policy")["data"]["policy.yaml"]
    loaded = parse_policy(policy).policy
    assert [t.token_sha256 for t in loaded.teams] == ["0" * 64]
    assert "admits no scraper" in notes({})


def test_ha_values(chart_with_dashboards: Path):
    objects = render(HA, chart_with_dashboards)
    deployment = one(objects, "Deployment", FULLNAME)
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (pdb["spec"]["selector"], deployment["spec"]["selector"]):
        assert selector["matchLabels"].items() <= pod_labels.items()

    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"] == [
        {"port": "admin", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    # job="crawlwarden" whatever the release is called: the rules select on it.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "crawlwarden"
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "proxy": 8080,
        "admin": 9090,
    }

    # Proxy traffic from the scraper namespaces (both lists), admin traffic from monitoring.
    gateway_policy = one(objects, "NetworkPolicy", FULLNAME)
    proxy_rule, admin_rule = gateway_policy["spec"]["ingress"]
    assert proxy_rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    by_name, by_label = proxy_rule["from"]
    assert by_name["namespaceSelector"]["matchExpressions"][0]["values"] == [
        "scrapers-a",
        "scrapers-b",
    ]
    assert by_label == {"namespaceSelector": {"matchLabels": {"crawl": "yes"}}}
    assert admin_rule["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert "monitoring" in json.dumps(admin_rule["from"]) and "scrapers" not in json.dumps(
        admin_rule["from"]
    )

    # In each locked-down namespace: egress only to the gateway pods' proxy port and to DNS.
    lockdowns = [
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] != FULLNAME
    ]
    assert sorted(o["metadata"]["namespace"] for o in lockdowns) == ["scrapers-a", "scrapers-b"]
    for lockdown in lockdowns:
        spec = lockdown["spec"]
        assert spec["podSelector"] == {} and spec["policyTypes"] == ["Egress"]
        to_gateway, to_dns = spec["egress"]
        (peer,) = to_gateway["to"]
        assert peer["namespaceSelector"]["matchLabels"] == {
            "kubernetes.io/metadata.name": NAMESPACE
        }
        assert peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
        assert to_gateway["ports"] == [{"port": 8080, "protocol": "TCP"}]
        assert {(p["port"], p["protocol"]) for p in to_dns["ports"]} == {(53, "UDP"), (53, "TCP")}

    # The scraper namespaces get the CA certificate the gateway presents, and no key.
    ca = secret_data(objects, f"{FULLNAME}-mitm-ca")
    published = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "crawlwarden-ca"
    ]
    assert sorted(o["metadata"]["namespace"] for o in published) == ["scrapers-a", "scrapers-b"]
    for cm in published:
        assert cm["data"] == {"ca.crt": ca["tls.crt"]}
        assert "PRIVATE KEY" not in json.dumps(cm)


def test_scraper_namespaces_may_reach_the_admin_port_to_read_their_usage():
    values = {**HA, "networkPolicy": {**HA["networkPolicy"], "scrapersReadUsage": True}}
    objects = render(values)
    proxy_rule, admin_rule = one(objects, "NetworkPolicy", FULLNAME)["spec"]["ingress"]
    ports = [{"port": 8080, "protocol": "TCP"}, {"port": 9090, "protocol": "TCP"}]
    assert proxy_rule["ports"] == ports  # the scraper namespaces' peers, both ports
    assert "scrapers" not in json.dumps(admin_rule["from"])
    lockdowns = [
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] != FULLNAME
    ]
    assert len(lockdowns) == 2
    for lockdown in lockdowns:
        to_gateway, _ = lockdown["spec"]["egress"]
        assert to_gateway["ports"] == ports


def test_the_service_monitor_scrapes_each_pod_once_with_a_statefulset_too():
    # Both Services of a StatefulSet matched its selector: Prometheus Operator made a target
    # per Service and pod, and every sum() on the dashboards read double.
    values = {**EXISTING, "metrics": {"serviceMonitor": {"enabled": True}}}
    objects = render(values)
    selector = one(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    services = [o for o in objects if o["kind"] == "Service"]
    assert len(services) == 2  # the gateway's and the governing headless one
    scraped = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == [FULLNAME]


def test_a_closed_metrics_endpoint_is_scraped_with_the_policys_metrics_token():
    [endpoint] = one(render(METRICS_CLOSED), "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": f"{FULLNAME}-admin-tokens", "key": "METRICS_TOKEN"},
    }
    existing = {**METRICS_CLOSED, "adminTokens": {"existingSecret": "crawl-admin-tokens"}}
    [endpoint] = one(render(existing), "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"]["credentials"]["name"] == "crawl-admin-tokens"
    [endpoint] = one(render(HA), "ServiceMonitor")["spec"]["endpoints"]
    assert "authorization" not in endpoint  # /metrics public: nothing to send


def test_existing_secrets_and_config_maps_are_referenced_not_created():
    objects = render(EXISTING)
    assert "Secret" not in kinds(objects)
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"] == []
    statefulset = one(objects, "StatefulSet", FULLNAME)
    assert statefulset["spec"]["replicas"] == 2
    assert statefulset["spec"]["serviceName"] == f"{FULLNAME}-headless"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    one(objects, "Service", f"{FULLNAME}-headless")
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1

    pod = statefulset["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "data" not in volumes, "the data dir is the claim, not an emptyDir"
    assert volumes["policy"]["configMap"] == {
        "name": "crawl-policy",
        "items": [{"key": "crawlwarden.yaml", "path": "policy.yaml"}],
    }
    assert volumes["signing-key"]["secret"]["secretName"] == "crawl-signing"
    assert volumes["signing-key"]["secret"]["items"] == [
        {"key": "ed25519.pem", "path": "audit.key"}
    ]
    assert volumes["mitm-ca"]["secret"]["secretName"] == "crawl-ca"
    assert volumes["upstream-ca"]["configMap"]["items"] == [{"key": "roots.pem", "path": "ca.pem"}]
    container = gateway_container(objects)
    env = {e["name"]: e for e in container["env"]}
    assert env["CRAWLWARDEN_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "crawl-redis",
        "key": "url",
    }
    assert env["CRAWLWARDEN_AUDIT_DSN"]["valueFrom"]["secretKeyRef"] == {
        "name": "crawl-pg",
        "key": "uri",
    }
    assert container["envFrom"] == [
        {"secretRef": {"name": "crawl-team-tokens"}},
        {"secretRef": {"name": "crawl-admin-tokens"}},
    ]
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/policy" not in annotations, "the chart cannot see an existing ConfigMap"


def test_internal_redis_is_reachable_by_the_gateway_only():
    objects = render(INTERNAL_REDIS)
    redis_name = f"{FULLNAME}-redis"
    redis = one(objects, "Deployment", redis_name)
    service = one(objects, "Service", redis_name)
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    env = {e["name"]: e.get("value") for e in gateway_container(objects)["env"]}
    assert env["CRAWLWARDEN_REDIS_URL"] == f"redis://{redis_name}:6379/0"
    gateway_labels = workload(objects)["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= gateway_labels.items()
    netpol = one(objects, "NetworkPolicy", redis_name)
    (rule,) = netpol["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= gateway_labels.items()


# -- the pod is what `crawlwarden run` accepts -----------------------------------------------


def pod_environment(objects: list[dict[str, Any]], pod_name: str) -> dict[str, str]:
    """The gateway container's environment as the kubelet sets it (existing Secrets: stand-ins)."""

    def secret_value(name: str, key: str) -> str:
        created = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == name]
        if created:
            return secret_data(objects, name)[key]
        return f"{{{name}/{key}}}"

    container = gateway_container(objects)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["secretRef"]["name"]
        created = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == name]
        env.update(secret_data(objects, name) if created else {})
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod_name
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_value(ref["name"], ref["key"])
    return env


def run_flags() -> set[str]:
    """CRAWLWARDEN_<FLAG> for every flag of `crawlwarden run`."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "run" in a.choices)
    run = sub.choices["run"]
    return {
        "CRAWLWARDEN_" + a.dest.upper()
        for a in run._actions
        if a.option_strings and a.dest != "help"
    }


@pytest.mark.parametrize("name", VALUE_SETS)
def test_crawlwarden_run_accepts_the_rendered_pod(
    name: str, chart_with_dashboards: Path, monkeypatch: pytest.MonkeyPatch
):
    values = VALUE_SETS[name]
    objects = render(values, chart_for(name, chart_with_dashboards))
    pod = workload(objects)["spec"]["template"]["spec"]
    container = gateway_container(objects)
    env = pod_environment(objects, pod_name=f"{FULLNAME}-0")

    chart_vars = (
        {k for k in env if k.startswith("CRAWLWARDEN_")}
        - set(values.get("teamTokens", {}).get("tokens", {}))
        - set(values.get("adminTokens", {}).get("tokens", {}))
    )
    assert chart_vars <= run_flags(), f"no such flag: {chart_vars - run_flags()}"
    # Service links would add CRAWLWARDEN_PORT and friends for a Service named crawlwarden.
    assert pod["enableServiceLinks"] is False

    # The parser reads its env defaults when it is built, typed ones once the command is run.
    for key in [k for k in os.environ if k.startswith("CRAWLWARDEN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert container["command"] == ["crawlwarden"]
    args = parse_args(container["args"])

    assert args.command == "run"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.listen == ("0.0.0.0", ports["proxy"])
    assert args.admin == ("0.0.0.0", ports["admin"])
    assert args.replica_id == f"{FULLNAME}-0"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert str(args.data_dir) in mounts and not mounts[str(args.data_dir)].get("readOnly")
    assert str(args.policy.parent) in mounts, "the policy file is on a mounted volume"
    assert mounts["/tmp"]  # the root file system is read-only
    if name == "ha":
        assert args.redis_url == values["redis"]["url"]
        assert args.audit_dsn == values["audit"]["dsn"]
    # A pod that starts while Redis is down takes 1/N of a `fail_mode: local` budget: N is the
    # most replicas that may run.
    autoscaling = values.get("autoscaling", {})
    most = (
        autoscaling["maxReplicas"] if autoscaling.get("enabled") else values.get("replicaCount", 1)
    )
    assert args.fleet_size == most
    if name == "default":
        assert args.redis_url is None and args.audit_dsn is None

    # The policy the pod mounts is valid with the pod's environment (token_env resolved).
    if not values.get("existingPolicyConfigMap"):
        text = one(objects, "ConfigMap", f"{FULLNAME}-policy")["data"]["policy.yaml"]
        loaded = parse_policy(text, source=str(args.policy)).policy
        if loaded.audit.signing_key_file:
            assert Path(loaded.audit.signing_key_file).parent.as_posix() in mounts

    # Probes hit the admin API's public health endpoints.
    paths = {r.path for r in ROUTES if not r.roles}
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        assert container[probe]["httpGet"] == {"path": path, "port": "admin"}
        assert path in paths
    # preStop, then SIGTERM, the gateway's drain and its fetch-log flush, all inside the grace
    # period.
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    grace = pod["terminationGracePeriodSeconds"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert float(env["CRAWLWARDEN_DRAIN_SECONDS"]) == Settings(policy_file=Path("p")).drain_seconds
    assert grace > sleep + float(env["CRAWLWARDEN_DRAIN_SECONDS"]) + FLUSH_SECONDS


# -- values that would break the gateway fail before anything is deployed --------------------


def test_the_grace_period_check_counts_the_fetch_log_flush():
    # After its drain the gateway waits up to FetchLog.close's timeout for the store (all of it
    # with PostgreSQL unreachable): a grace period of preStop + drain only lets the kubelet kill
    # it mid-flush. The chart's figure is the code's.
    chart_flush = re.search(
        r'define "crawlwarden.flushSeconds" -}}(\d+)\{\{',
        (CHART / "templates" / "_helpers.tpl").read_text(),
    )
    assert chart_flush and int(chart_flush.group(1)) == FLUSH_SECONDS
    stop = {"preStopSleepSeconds": 5, "drainSeconds": 12}
    # ... and the rest of the stop after it: a stop with Redis and PostgreSQL both silent took
    # 36 s of a 30 s drain (an SRE's probe): a grace period of 66 s passed the check.
    rest = re.search(
        r'define "crawlwarden.stopRestSeconds" -}}(\d+)\{\{',
        (CHART / "templates" / "_helpers.tpl").read_text(),
    )
    assert rest and int(rest.group(1)) >= 8
    worst = 5 + 12 + FLUSH_SECONDS + int(rest.group(1))
    assert "must be at least" in render_error({**stop, "terminationGracePeriodSeconds": worst - 1})
    pod = workload(render({**stop, "terminationGracePeriodSeconds": worst}))["spec"]
    assert pod["template"]["spec"]["terminationGracePeriodSeconds"] == worst
    # The defaults leave room beyond the worst case for the rest of the stop.
    defaults = workload(render({}))["spec"]["template"]["spec"]
    assert defaults["terminationGracePeriodSeconds"] >= 5 + 30 + FLUSH_SECONDS + 5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 3}, "each keep their own budgets"),
        (
            {"autoscaling": {"enabled": True}, "redis": {"url": "redis://r:6379/0"}},
            "one shared fetch log",
        ),
        (
            {"redis": {"url": "redis://r:6379/0", "internal": {"enabled": True}}},
            "give one of redis.url",
        ),
        ({"audit": {"dsn": "postgresql://pg/db"}}, "needs one checkpoint signing key"),
        (
            {"audit": {"dsn": "postgresql://pg/db"}, "signingKey": {"privateKey": SIGNING_KEY}},
            f"set audit.signing_key_file: {KEY_PATH}",
        ),
        ({"policy": policy_text()}, "ADMIN_TOKEN, AUDITOR_TOKEN"),
        ({"policy": "teams: [unclosed"}, "policy: not valid YAML"),
        ({"policy": ""}, "give the policy inline"),
        ({"preStopSleepSeconds": 40}, "must be at least preStopSleepSeconds"),
        ({"drainSeconds": 90}, "drainSeconds (90)"),
        (
            {"terminationGracePeriodSeconds": 20},
            "must be at least preStopSleepSeconds (5) + drainSeconds",
        ),
        (
            # Covers the sleep and the drain, not the flush after them.
            {"terminationGracePeriodSeconds": 36},
            "flush wait (30) + the rest of the stop (10) = 75",
        ),
        (
            {"extraEnv": [{"name": "CRAWLWARDEN_DRAIN_SECONDS", "value": "90"}]},
            "set the drain with drainSeconds",
        ),
        ({"networkPolicy": {"enabled": True}}, "name the scraper namespaces"),
        ({"egressLockdown": {"enabled": True}}, "list the scraper namespaces"),
        (
            {"egressLockdown": {"enabled": True, "namespaces": ["scrapers", NAMESPACE]}},
            "the gateway's own namespace",
        ),
        (
            {
                "replicaCount": 2,
                "redis": {"url": "redis://r/0"},
                "audit": {"dsn": "postgresql://p/d"},
                "signingKey": {"privateKey": SIGNING_KEY},
                "mitmCA": {"generate": False},
                "policy": policy_text(audit={"signing_key_file": KEY_PATH}),
                **TOKENS,
            },
            "must present one CA",
        ),
        (
            {"mitmCA": {"existingSecret": "ca", "publish": {"namespaces": ["s"]}}},
            "copy its certificate into the scraper namespaces yourself",
        ),
        (
            {**METRICS_CLOSED, "metrics": {"serviceMonitor": {"enabled": True}}},
            "so /metrics needs one: set metrics.serviceMonitor.tokenEnv",
        ),
        (
            {
                **METRICS_CLOSED,
                "metrics": {"serviceMonitor": {"enabled": True, "tokenEnv": "OTHER_TOKEN"}},
            },
            "OTHER_TOKEN is not in adminTokens.tokens",
        ),
        (
            {
                **METRICS_CLOSED,
                "adminTokens": {"existingSecret": "s"},
                "metrics": {"serviceMonitor": {"enabled": True, "tokenEnv": "ADMIN_TOKEN"}},
            },
            "no admin_tokens entry of the policy has role metrics and token_env ADMIN_TOKEN",
        ),
        ({"dashboards": {"enabled": True}}, "run helm/sync-dashboards.sh"),
        ({"metrics": {"prometheusRule": {"enabled": True}}}, "run helm/sync-dashboards.sh"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_render_refuses_values_that_break_a_promise(
    values: dict[str, Any], message: str, tmp_path: Path
):
    chart = tmp_path / "crawlwarden"
    shutil.copytree(CHART, chart)
    shutil.rmtree(chart / "dashboards", ignore_errors=True)  # a chart before any sync
    assert message in render_error(values, chart)


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": "three"},
        {"replicaCount": -1},
        {"replicaCount": 1, "replicaCuont": 2},
        {"redis": {"urll": "redis://r:6379"}},
        {"redis": {"url": "http://r:6379"}},
        {"audit": {"dsn": "mysql://db"}},
        {"logLevel": "VERBOSE"},
        {"policy": {"version": 1}},
        {"teamTokens": {"tokens": {"VISION-DATA": "t"}}},
        {"teamTokens": {"tokens": {"VISION_DATA_TOKEN": ""}}},
        {"containerPorts": {"proxy": 70000, "admin": 9090}},
        {"terminationGracePeriodSeconds": 1},
        {"drainSeconds": 0},
        {"image": {"repository": "crawlwarden", "digest": "latest"}},
        {"persistence": {"retentionPolicy": {"whenScaled": "Keep"}}},
        {"egressLockdown": {"namespaces": ["Scrapers_A"]}},
        {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
        {"signingKey": {"privateKey": "not a PEM"}},
    ],
    ids=lambda v: json.dumps(v)[:60],
)
def test_values_schema_rejects_bad_values(values: dict[str, Any]):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(chart.merge_values(values))
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_values_schema_accepts_the_values_sets(name: str):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(VALUE_SETS[name]))


def test_policy_or_secrets_changes_roll_the_pods():
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        return workload(render(values))["spec"]["template"]["metadata"]["annotations"]

    ca = {"mitmCA": {"generate": False}}  # a generated CA differs on every offline render
    first = annotations({**INTERNAL_REDIS, **ca})
    assert first == annotations({**INTERNAL_REDIS, **ca})
    changed = annotations(
        {**INTERNAL_REDIS, **ca, "policy": policy_text(retention={"fetch_records_days": 30})}
    )
    assert changed["checksum/policy"] != first["checksum/policy"]
    assert changed["checksum/secrets"] == first["checksum/secrets"]
    new_token = {"teamTokens": {"tokens": {"VISION_DATA_TOKEN": "rotated"}}}
    rotated = annotations({**INTERNAL_REDIS, **ca, **new_token})
    assert rotated["checksum/secrets"] != first["checksum/secrets"]
    assert rotated["checksum/policy"] == first["checksum/policy"]


# -- dashboards and rules are the files of dashboards/ ---------------------------------------


def embedded_files(directory: Path) -> dict[str, bytes]:
    """What the chart embeds from a dashboards directory."""
    if not directory.is_dir():
        return {}
    names = [p for p in directory.glob("*.json")] + [directory / "alerts.yaml"]
    return {p.name: p.read_bytes() for p in names if p.is_file()}


def test_chart_copies_of_dashboards_are_the_files_of_dashboards():
    assert embedded_files(CHART / "dashboards") == embedded_files(DASHBOARDS), (
        "run helm/sync-dashboards.sh"
    )
    check = subprocess.run(
        [str(ROOT / "helm" / "sync-dashboards.sh"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_real_chart_embeds_exactly_the_dashboards_and_rules():
    values = {"dashboards": {"enabled": True}, "metrics": {"prometheusRule": {"enabled": True}}}
    originals = embedded_files(DASHBOARDS)
    dashboards = {k: v for k, v in originals.items() if k.endswith(".json")}
    if not dashboards or "alerts.yaml" not in originals:
        # Before the dashboards exist, enabling them says what to do instead of rendering nothing.
        assert "run helm/sync-dashboards.sh" in render_error(values)
        return
    objects = render(values)
    assert_embeds(objects, originals)


def assert_embeds(objects: list[dict[str, Any]], originals: dict[str, bytes]) -> None:
    configmaps = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    embedded = {}
    for cm in configmaps:
        assert cm["metadata"]["name"].startswith(f"{FULLNAME}-dashboard-")
        ((file, text),) = cm["data"].items()
        embedded[file] = text.encode()
    assert embedded == {k: v for k, v in originals.items() if k.endswith(".json")}
    rule = one(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(originals["alerts.yaml"])["groups"]


def test_sample_dashboards_are_embedded_byte_for_byte(chart_with_dashboards: Path):
    objects = render(HA, chart_with_dashboards)
    assert_embeds(objects, embedded_files(chart_with_dashboards / "dashboards"))
    names = sorted(
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "ConfigMap" and "dashboard" in o["metadata"]["name"]
    )
    assert names == [f"{FULLNAME}-dashboard-fetch-log", f"{FULLNAME}-dashboard-sites"]


def test_rules_given_as_a_prometheusrule_manifest_are_embedded(tmp_path: Path):
    chart = tmp_path / "crawlwarden"
    shutil.copytree(CHART, chart)
    write_sample_dashboards(chart / "dashboards")
    groups = yaml.safe_load(SAMPLE_ALERTS)["groups"]
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "spec": {"groups": groups},
    }
    (chart / "dashboards" / "alerts.yaml").write_text(yaml.safe_dump(manifest))
    objects = render({"metrics": {"prometheusRule": {"enabled": True}}}, chart)
    assert one(objects, "PrometheusRule")["spec"]["groups"] == groups


def test_sync_script_copies_checks_and_prunes(tmp_path: Path):
    (tmp_path / "helm" / "crawlwarden").mkdir(parents=True)
    script = tmp_path / "helm" / "sync-dashboards.sh"
    shutil.copy2(ROOT / "helm" / "sync-dashboards.sh", script)
    write_sample_dashboards(tmp_path / "dashboards")
    (tmp_path / "dashboards" / "notes.md").write_text("not embedded")
    copies = tmp_path / "helm" / "crawlwarden" / "dashboards"
    copies.mkdir()
    (copies / "retired.json").write_text("{}")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(script), *args], capture_output=True, text=True)

    stale = run("--check")
    assert stale.returncode == 1
    assert "sites.json differs" in stale.stderr and "retired.json has no original" in stale.stderr
    assert run().returncode == 0
    assert embedded_files(copies) == embedded_files(tmp_path / "dashboards")
    assert sorted(p.name for p in copies.iterdir()) == [
        "Fetch_Log.json",
        "alerts.yaml",
        "sites.json",
    ]
    assert run("--check").returncode == 0
    (tmp_path / "dashboards" / "sites.json").write_text('{"title": "edited"}\n')
    assert run("--check").returncode == 1


# -- the rendered pod, started: one CA for every replica ------------------------------------


class Pod:
    """A rendered gateway pod as real processes: volumes laid out in a directory, the init
    container's script run with sh, then the container's command with its environment."""

    def __init__(
        self, objects: list[dict[str, Any]], root: Path, name: str, files: dict[str, Path]
    ):
        self.root = root
        self.name = name
        spec = workload(objects)["spec"]["template"]["spec"]
        self.container = next(c for c in spec["containers"] if c["name"] == "gateway")
        self.volumes = {v["name"]: v for v in spec["volumes"]}
        self.mounts: dict[str, Path] = {}  # container path -> local directory
        for container in [*spec.get("initContainers", []), self.container]:
            for mount in container["volumeMounts"]:
                local = root / mount["name"]
                self.mounts[mount["mountPath"]] = local
                self._populate(objects, self.volumes[mount["name"]], local, files)
        self.init = spec.get("initContainers", [])
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _populate(
        self,
        objects: list[dict[str, Any]],
        volume: dict[str, Any],
        local: Path,
        files: dict[str, Path],
    ) -> None:
        if local.exists():
            return
        local.mkdir(parents=True)
        if "configMap" in volume or "secret" in volume:
            source = volume.get("configMap") or volume["secret"]
            name = source.get("name") or source.get("secretName")
            kind = "ConfigMap" if "configMap" in volume else "Secret"
            made = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
            for item in source["items"]:
                if made:
                    data = made[0]["data"][item["key"]]
                    content = base64.b64decode(data) if kind == "Secret" else data.encode()
                else:  # a user's object: the test supplies it
                    content = files[f"{name}/{item['key']}"].read_bytes()
                (local / item["path"]).write_bytes(content)
                os.chmod(local / item["path"], source.get("defaultMode", 0o644))

    def local(self, value: str) -> str:
        for path, local in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if value == path or value.startswith(path + "/"):
                return str(local) + value[len(path) :]
        return value

    def env(self, container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
        if container is self.container:
            pod_env = pod_environment(objects, self.name)
        else:
            pod_env = {e["name"]: e["value"] for e in container.get("env", [])}
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRAWLWARDEN_")}
        return {**env, **{k: self.local(v) for k, v in pod_env.items()}}

    def start(self, objects: list[dict[str, Any]]) -> Pod:
        for init in self.init:
            assert init["command"] == ["sh", "-c"]
            subprocess.run(["sh", "-c", *init["args"]], env=self.env(init, objects), check=True)
        env = self.env(self.container, objects)
        env["CRAWLWARDEN_LISTEN"] = f"127.0.0.1:{self.port}"
        env["CRAWLWARDEN_ADMIN"] = f"127.0.0.1:{self.admin_port}"
        assert self.container["command"] == ["crawlwarden"]
        args = [self.local(a) for a in self.container["args"]]
        log = (self.root / "gateway.log").open("ab")
        self.proc = subprocess.Popen([CRAWLWARDEN, *args], env=env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.logs()
            try:
                probe = f"http://127.0.0.1:{self.admin_port}/readyz"
                with urllib.request.urlopen(probe, timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"not ready:\n{self.logs()}")

    def logs(self) -> str:
        return (self.root / "gateway.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(40)


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    started: list[Pod] = []
    yield started
    for pod in started:
        pod.stop()


def strict_python_fetch(proxy_port: int, target: str, ca_cert: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    conn = http.client.HTTPSConnection("127.0.0.1", proxy_port, context=context, timeout=20)
    credentials = base64.b64encode(f"{TEAM}:{TEAM_TOKEN}".encode()).decode()
    conn.set_tunnel(target, headers={"Proxy-Authorization": f"Basic {credentials}"})
    try:
        conn.request("GET", "/", headers={"X-Crawl-Project": PROJECT})
        return conn.getresponse().status
    finally:
        conn.close()


def test_replicas_of_the_rendered_pod_present_the_charts_ca(
    tmp_path: Path, tls_site: Site, test_ca: LocalCA, pods: list[Pod]
):
    values = {
        **INTERNAL_REDIS,
        "redis": {},
        "networkPolicy": {},
        "upstreamTrustedCA": {"configMap": "test-roots", "key": "ca.pem"},
    }
    objects = render(values)
    files = {"test-roots/ca.pem": test_ca.ca_cert}
    ca = secret_data(objects, f"{FULLNAME}-mitm-ca")
    ca_cert = tmp_path / "chart-ca.crt"
    ca_cert.write_text(ca["tls.crt"])

    # Two pods of one rendering (two replicas, or a pod and its replacement): nothing in common
    # but the chart's objects.
    for name in ("cw-crawlwarden-7d9f-a1", "cw-crawlwarden-7d9f-b2"):
        pod = Pod(objects, tmp_path / name, name, files)
        pods.append(pod.start(objects))
        data = pod.mounts["/var/lib/crawlwarden"]
        assert (data / "mitmproxy-ca-cert.pem").read_text() == ca["tls.crt"]
        assert oct((data / "mitmproxy-ca.pem").stat().st_mode & 0o777) == "0o600"
        result = curl(
            tls_site.url("site-a.test", "/"),
            proxy=f"http://{TEAM}:{TEAM_TOKEN}@127.0.0.1:{pod.port}",
            headers={"X-Crawl-Project": PROJECT},
            cacert=ca_cert,
        )
        assert (result.returncode, result.status) == (0, 200), result.stderr + pod.logs()
        # Python clients too, with the strict X.509 checks Python 3.13 turns on by default.
        assert strict_python_fetch(pod.port, f"site-a.test:{tls_site.port}", ca_cert) == 200
        started = [json.loads(line) for line in pod.logs().splitlines() if '"started"' in line]
        assert started and started[0]["replica"] == name
    assert tls_site.count() == 4


# -- the container image ---------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    return instructions[starts[-1] :]


def test_dockerfile_runs_crawlwarden_as_a_non_root_user():
    """Not built here (no container engine on this machine): read for what must hold."""
    instructions = dockerfile_instructions()
    images = [rest.split()[0] for k, rest in instructions if k == "FROM"]
    args = dict(rest.split("=", 1) for k, rest in instructions if k == "ARG" and "=" in rest)
    images = [args.get(i.strip("${}"), i) for i in images]
    assert all(i == "python:3.12-slim" or not i.startswith("python") for i in images), images
    assert any(i == "python:3.12-slim" for i in images)
    final = final_stage(instructions)
    (user,) = [rest for k, rest in final if k == "USER"]
    uid, _, gid = user.partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it; the chart runs as the same ids.
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(uid) == values["podSecurityContext"]["runAsUser"]
    assert int(gid) == values["podSecurityContext"]["runAsGroup"]
    exposed = {int(p.split("/")[0]) for k, rest in final if k == "EXPOSE" for p in rest.split()}
    assert exposed == set(values["containerPorts"].values())
    (entrypoint,) = [json.loads(rest) for k, rest in final if k == "ENTRYPOINT"]
    assert entrypoint == ["crawlwarden"]
    (cmd,) = [json.loads(rest) for k, rest in final if k == "CMD"]
    parsed = build_parser().parse_args(cmd)
    assert parsed.command == "run" and str(parsed.policy) == "/etc/crawlwarden/policy.yaml"
    # Only what runs: the package without its dev extras, no tests.
    runs = " ".join(rest for k, rest in instructions if k == "RUN")
    assert "pip install" in runs and "[dev]" not in runs and "-e " not in runs
    # `crawlwarden run` restarts under python -O: its bytecode is built too (read-only root).
    assert "python -O -m compileall" in runs
    copied = [rest.split()[:-1] for k, rest in instructions if k == "COPY" and "--from" not in rest]
    sources = {s for c in copied for s in c}
    assert sources <= {"pyproject.toml", "README.md", "proxy", "addons", "proxy/", "addons/"}, (
        sources
    )


def test_dockerignore_sends_only_what_the_image_installs():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: everything is excluded first"
    included = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "proxy", "addons"}
    assert any("__pycache__" in p for p in patterns if not p.startswith("!"))


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_finds_no_problem(name: str, chart_with_dashboards: Path):
    report = helm.lint(
        chart_for(name, chart_with_dashboards),
        VALUE_SETS[name],
        strict=True,
        namespace=NAMESPACE,
        kube_version="v" + KUBE_VERSIONS[0],
    )
    # Severity 1 is information (Chart.yaml has no icon); 2 and 3 are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert report["errors"] == []


def test_the_rules_select_the_job_the_servicemonitor_gives_under_any_name():
    # With nameOverride, the Service's app.kubernetes.io/name (the ServiceMonitor's jobLabel)
    # changes, so job="crawlwarden" in the rules would select nothing: no alert would fire.
    values = {
        "nameOverride": "egress",
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
    }
    if "alerts.yaml" not in embedded_files(CHART / "dashboards"):
        pytest.skip("the chart has no copy of dashboards/ (helm/sync-dashboards.sh)")
    objects = render(values)
    monitor = one(objects, "ServiceMonitor")
    service = next(o for o in objects if o["kind"] == "Service" and "proxy" in str(o["spec"]))
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    assert job == "egress"
    exprs = [
        r["expr"] for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]
    ]
    jobs = {m for e in exprs for m in re.findall(r'job="([^"]*)"', e)}
    assert jobs == {"egress"}
