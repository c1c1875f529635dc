"""Assertions on the manifests `helm template` renders from helm/nerve."""

from __future__ import annotations

import base64
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import CHART, FULLNAME, Manifests, render, render_error, render_notes
from values_doc import VALUES_FILE, documented, leaves, table

# Every setting nerve-server reads from NERVE_* variables (server/src/config.rs and the structs it
# nests); the ConfigMap must not invent others, which the server would only warn about.
KNOWN_SETTINGS = {
    "NERVE_LISTEN",
    "NERVE_DATA_DIR",
    "NERVE_STORE",
    "NERVE_STREAMS",
    "NERVE_LOG_FORMAT",
    "NERVE_LOG_LEVEL",
    "NERVE_HEALTH_CHECK_INTERVAL",
    "NERVE_SHUTDOWN_DELAY",
    "NERVE_SHUTDOWN_TIMEOUT",
    "NERVE_POSTGRES__MAX_CONNECTIONS",
    "NERVE_REDIS__KEY_PREFIX",
    "NERVE_REDIS__STREAM_MAX_LEN",
    "NERVE_BUS__DEFAULT_ACK_DEADLINE",
    "NERVE_BUS__DEFAULT_MAX_ATTEMPTS",
    "NERVE_BUS__DEFAULT_MAX_IN_FLIGHT",
    "NERVE_BUS__MAX_IN_FLIGHT_LIMIT",
    "NERVE_BUS__DEFAULT_HEARTBEAT",
    "NERVE_BUS__DEFAULT_REQUEST_TIMEOUT",
    "NERVE_BUS__MAX_ACK_DEADLINE",
    "NERVE_BUS__MAX_REQUEST_TIMEOUT",
    "NERVE_BUS__MAX_GROUPS_PER_TENANT",
    "NERVE_LIMITS__MAX_BATCH_EVENTS",
    "NERVE_LIMITS__MAX_BATCH_BYTES",
    "NERVE_LIMITS__MAX_EVENT_BYTES",
    "NERVE_LIMITS__MAX_EXTENSIONS",
    "NERVE_LIMITS__MAX_ATTRIBUTE_BYTES",
    "NERVE_METRICS__LISTEN",
    "NERVE_METRICS__MAX_LABEL_VALUES",
    "NERVE_METRICS__GROUP_SAMPLE_INTERVAL",
    "NERVE_TRACING__OTLP_ENDPOINT",
    "NERVE_HEALTH_LISTEN",
    "NERVE_INSECURE",
    "NERVE_CONNECTIONS__MAX_CONCURRENT_STREAMS",
    "NERVE_CONNECTIONS__MAX_STREAMS_PER_PRINCIPAL",
    "NERVE_CONNECTIONS__PUBLISH_RATE_PER_PRINCIPAL",
    "NERVE_CONNECTIONS__PUBLISH_BURST",
    "NERVE_CONNECTIONS__STREAM_OPEN_TIMEOUT",
    "NERVE_CONNECTIONS__KEEPALIVE_INTERVAL",
    "NERVE_CONNECTIONS__KEEPALIVE_TIMEOUT",
    "NERVE_TLS__CERT_FILE",
    "NERVE_TLS__KEY_FILE",
    "NERVE_TLS__CLIENT_CA_FILE",
    "NERVE_TLS__CLIENT_AUTH",
    "NERVE_TLS__HANDSHAKE_TIMEOUT",
    "NERVE_AUTH__JWT__ISSUER",
    "NERVE_AUTH__JWT__AUDIENCE",
    "NERVE_AUTH__JWT__ALGORITHMS",
    "NERVE_AUTH__JWT__HS_SECRET_FILE",
    "NERVE_AUTH__JWT__PUBLIC_KEY_FILES",
    "NERVE_AUTH__JWT__JWKS_FILE",
    "NERVE_AUTH__JWT__LEEWAY",
    "NERVE_AUTH__JWT__MAX_TOKEN_BYTES",
    "NERVE_AUTH__JWT__TENANT_CLAIM",
    "NERVE_AUTH__POLICY_FILE",
    "NERVE_AUTH__RELOAD_CHECK_INTERVAL",
    "NERVE_AUTH__AUDIT_RETENTION",
}



def test_known_settings_are_settings_of_the_server() -> None:
    """KNOWN_SETTINGS against `nerve-server --help`, which lists every setting (NERVE_SERVER_BIN)."""
    import os
    import subprocess

    server = os.environ.get("NERVE_SERVER_BIN")
    if not server:
        # not skipped: a skip here passed every chart check without ever comparing the chart with the server
        pytest.fail(
            "NERVE_SERVER_BIN is not set: it names the nerve-server binary whose --help lists the settings "
            "(scripts/helm-check.sh sets it, from NERVE_SERVER_BIN or target/debug/nerve-server)"
        )
    listed = set(re.findall(r"\b(NERVE_[A-Z0-9_]+)", subprocess.run(
        [server, "--help"], check=True, capture_output=True, text=True).stdout))
    assert KNOWN_SETTINGS <= listed, KNOWN_SETTINGS - listed


PRODUCTION = "production-existing-secrets.yaml"
HA = "production-ha.yaml"
EMBEDDED_PVC = "embedded-persistence.yaml"
EMBEDDED_EPHEMERAL = "embedded-ephemeral.yaml"
SECURE = "tls-mtls-jwt.yaml"
PROD_SETS = ["mode=production", "postgres.existingSecret=pg", "redis.existingSecret=rd"]


# ---------------------------------------------------------------- what is rendered


def test_defaults_render_embedded_single_replica() -> None:
    m = render()
    assert m.kinds() == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "ServiceAccount"]
    assert m.deployment["spec"]["replicas"] == 1
    assert m.deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert m.config["NERVE_STORE"] == "embedded"
    assert m.config["NERVE_STREAMS"] == "embedded"
    assert m.config["NERVE_DATA_DIR"] == "/var/lib/nerve"
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert m.container["image"] == f"ghcr.io/nerve-bus/nerve:{app_version}"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((), set()),
        ((PRODUCTION,), set()),
        ((EMBEDDED_PVC,), set()),
        ((EMBEDDED_EPHEMERAL,), {"NetworkPolicy"}),
        ((HA,), {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}),
        ((SECURE,), {"NetworkPolicy"}),
    ],
)
def test_hpa_pdb_networkpolicy_only_when_enabled(values: tuple[str, ...], expected: set[str]) -> None:
    m = render(*values)
    optional = {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"}
    assert optional & set(m.kinds()) == expected


@pytest.mark.parametrize(
    ("switch", "kind"),
    [
        ("autoscaling.enabled", "HorizontalPodAutoscaler"),
        ("podDisruptionBudget.enabled", "PodDisruptionBudget"),
        ("networkPolicy.enabled", "NetworkPolicy"),
        ("metrics.serviceMonitor.enabled", "ServiceMonitor"),
    ],
)
def test_each_switch_alone(switch: str, kind: str) -> None:
    base = [*PROD_SETS, "metrics.enabled=true"]
    assert render(sets=base).maybe(kind) is None
    assert render(sets=[*base, f"{switch}=true"]).maybe(kind) is not None


def test_every_manifest_is_namespaced_and_labelled(any_values: tuple[str, ...]) -> None:
    m = render(*any_values)
    for doc in m.docs:
        meta = doc["metadata"]
        assert meta["namespace"] == "ns", doc["kind"]
        assert meta["labels"]["app.kubernetes.io/name"] == "nerve"
        assert meta["labels"]["app.kubernetes.io/instance"] == "t"


# ---------------------------------------------------------------- probes


def _probes(m: Manifests) -> dict[str, dict]:
    c = m.container
    return {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}


# the health entry each probe checks by default: nerve.v1.Liveness is SERVING from start until shutdown
# whatever the backends do, nerve.v1.Readiness while the event store answers
PROBE_SERVICES = {
    "startupProbe": "nerve.v1.Liveness",
    "readinessProbe": "nerve.v1.Readiness",
    "livenessProbe": "nerve.v1.Liveness",
}


def test_probes_are_native_grpc_on_the_plaintext_health_port(any_values: tuple[str, ...]) -> None:
    m = render(*any_values)
    ports = {p["name"]: p["containerPort"] for p in m.container["ports"]}
    grpc, health = ports["grpc"], ports["health"]
    assert grpc != health
    assert m.config["NERVE_LISTEN"] == f"0.0.0.0:{grpc}"
    # the health listener is always on: the kubelet's gRPC probes can do neither TLS nor credentials
    assert m.config["NERVE_HEALTH_LISTEN"] == f"0.0.0.0:{health}"
    for name, probe in _probes(m).items():
        timing = {"periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"}
        assert set(probe) - timing == {"grpc"}, name
        assert probe["grpc"] == {"port": health, "service": PROBE_SERVICES[name]}, name
    # kubelet-only: in no Service
    service_ports = [p for service in m.all("Service") for p in service["spec"]["ports"]]
    assert "health" not in {p["name"] for p in service_ports}
    assert health not in {p["port"] for p in service_ports}
    assert "health" not in {p["targetPort"] for p in service_ports}


def test_probes_follow_the_health_port_not_the_container_port() -> None:
    m = render(EMBEDDED_EPHEMERAL, sets=["healthPort=7002"])  # containerPort 7001, service port 7000
    assert all(p["grpc"]["port"] == 7002 for p in _probes(m).values())
    assert m.config["NERVE_HEALTH_LISTEN"] == "0.0.0.0:7002"
    assert m.config["NERVE_LISTEN"] == "0.0.0.0:7001"
    service = m.named("Service", FULLNAME)
    assert service["spec"]["ports"][0]["port"] == 7000
    assert service["spec"]["ports"][0]["targetPort"] == "grpc"


def test_probes_stay_plaintext_with_tls() -> None:
    m = render(SECURE)
    assert m.config["NERVE_TLS__CERT_FILE"]  # TLS on the main port...
    for probe in _probes(m).values():  # ...the probes still reach the plaintext health port
        assert probe["grpc"]["port"] == 8081


def test_probe_service_and_switches() -> None:
    m = render(sets=["probes.liveness.service=nerve.v1.EventBus", "probes.startup.enabled=false"])
    assert m.container["livenessProbe"]["grpc"]["service"] == "nerve.v1.EventBus"
    assert "startupProbe" not in m.container
    overall = render(sets=["probes.readiness.service=", "probes.startup.service=nerve.v1.Readiness"])
    assert overall.container["readinessProbe"]["grpc"]["service"] == ""
    assert overall.container["startupProbe"]["grpc"]["service"] == "nerve.v1.Readiness"
    assert "/probes/readiness/service" in render_error(sets=["probes.readiness.service=nope"])


def test_liveness_restarts_only_a_hung_process() -> None:
    """nerve.v1.Liveness does not follow the backends, so a liveness failure means the process did not
    answer: restart it within a minute, but not for one slow answer."""
    live = render().container["livenessProbe"]
    assert live["grpc"]["service"] == "nerve.v1.Liveness"
    assert 2 <= live["failureThreshold"]
    assert live["periodSeconds"] * live["failureThreshold"] <= 60
    assert live["timeoutSeconds"] < live["periodSeconds"]


def test_readiness_follows_the_event_store_and_startup_allows_the_migrations() -> None:
    c = render(sets=PROD_SETS).container
    # a Redis outage must not take every replica out of the Service: publishes commit without Redis
    assert c["readinessProbe"]["grpc"]["service"] == "nerve.v1.Readiness"
    startup = c["startupProbe"]
    assert startup["grpc"]["service"] == "nerve.v1.Liveness"  # the port opens after migrations and connects
    # a migration building an index over the whole events table takes minutes on a large store; a pod
    # killed in the middle rolls the migration back and starts it over, for ever (crash loop)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


# ---------------------------------------------------------------- security


def test_security_context(any_values: tuple[str, ...]) -> None:
    m = render(*any_values)
    pod, sc = m.pod["securityContext"], m.container["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 65532 and pod["runAsGroup"] == 65532
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert m.pod["automountServiceAccountToken"] is False
    assert m.pod["enableServiceLinks"] is False
    assert m.pod["terminationGracePeriodSeconds"] == 30


def test_writable_volumes_only_in_embedded_mode() -> None:
    plain = render(sets=PROD_SETS)
    assert "volumeMounts" not in plain.container and "volumes" not in plain.pod
    prod = render(PRODUCTION)  # TLS, client CA and policy: read-only mounts only
    assert prod.container["volumeMounts"] and all(v["readOnly"] is True for v in prod.container["volumeMounts"])
    assert all(set(v) & {"secret", "configMap"} for v in prod.pod["volumes"])

    emb = render(EMBEDDED_PVC)
    mounts = {v["name"]: v["mountPath"] for v in emb.container["volumeMounts"]}
    assert mounts == {"data": "/var/lib/nerve", "tmp": "/tmp"}
    volumes = {v["name"]: v for v in emb.pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": f"{FULLNAME}-data"}
    assert "emptyDir" in volumes["tmp"]

    ephemeral = render(EMBEDDED_EPHEMERAL)
    volumes = {v["name"]: v for v in ephemeral.pod["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert ephemeral.maybe("PersistentVolumeClaim") is None


# ---------------------------------------------------------------- secrets and configuration


def test_existing_secrets_are_referenced_not_copied() -> None:
    m = render(PRODUCTION)
    assert m.env["NERVE_STORE"]["valueFrom"] == {"secretKeyRef": {"name": "nerve-postgres", "key": "uri"}}
    assert m.env["NERVE_STREAMS"]["valueFrom"] == {"secretKeyRef": {"name": "nerve-redis", "key": "url"}}
    assert m.maybe("Secret") is None
    assert "NERVE_STORE" not in m.config and "NERVE_STREAMS" not in m.config
    assert "NERVE_DATA_DIR" not in m.config
    assert m.config["NERVE_POSTGRES__MAX_CONNECTIONS"] == "24"
    assert m.config["NERVE_REDIS__KEY_PREFIX"] == "nerve-prod"
    assert m.deployment["spec"]["replicas"] == 3
    assert m.deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert "checksum/secret" not in m.deployment["spec"]["template"]["metadata"]["annotations"]


def test_default_secret_keys() -> None:
    m = render(sets=PROD_SETS)
    assert m.env["NERVE_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "postgres-url"}
    assert m.env["NERVE_STREAMS"]["valueFrom"]["secretKeyRef"] == {"name": "rd", "key": "redis-url"}


def test_urls_given_as_values_go_into_a_chart_secret_only() -> None:
    m = render(HA)
    secret = m.one("Secret")
    assert secret["metadata"]["name"] == f"{FULLNAME}-backends"
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "postgres-url": "postgres://nerve:example@postgres.db.svc:5432/nerve",
        "redis-url": "redis://:example@redis.db.svc:6379/0",
    }
    chart_secret = f"{FULLNAME}-backends"
    assert m.env["NERVE_STORE"]["valueFrom"]["secretKeyRef"] == {"name": chart_secret, "key": "postgres-url"}
    assert m.env["NERVE_STREAMS"]["valueFrom"]["secretKeyRef"] == {"name": chart_secret, "key": "redis-url"}
    assert "checksum/secret" in m.deployment["spec"]["template"]["metadata"]["annotations"]
    # the plain URL appears nowhere but base64-encoded in the Secret
    for doc in m.docs:
        if doc["kind"] != "Secret":
            assert "example@" not in json.dumps(doc), doc["kind"]


def test_mixed_secret_sources() -> None:
    m = render(sets=["mode=production", "postgres.existingSecret=pg", "redis.url=redis://r:6379"])
    assert m.env["NERVE_STORE"]["valueFrom"]["secretKeyRef"]["name"] == "pg"
    assert m.env["NERVE_STREAMS"]["valueFrom"]["secretKeyRef"]["name"] == f"{FULLNAME}-backends"
    assert set(m.one("Secret")["data"]) == {"redis-url"}


def test_configmap_holds_only_known_settings_with_plain_numbers(any_values: tuple[str, ...]) -> None:
    m = render(*any_values)
    config = m.config
    assert set(config) <= KNOWN_SETTINGS, set(config) - KNOWN_SETTINGS
    for name, value in config.items():
        assert isinstance(value, str), name
        assert not re.search(r"\de\+\d", value), f"{name}={value} in scientific notation"
    assert config["NERVE_LIMITS__MAX_BATCH_BYTES"] == "4194304"
    # the ConfigMap never holds a backend URL
    assert not any(v.startswith(("postgres", "redis://")) for v in config.values())


def test_every_bus_limit_and_connection_setting_is_rendered() -> None:
    config = render().config
    expected = {s for s in KNOWN_SETTINGS if s.startswith(("NERVE_BUS__", "NERVE_LIMITS__", "NERVE_CONNECTIONS__"))}
    assert expected <= set(config)
    assert config["NERVE_BUS__MAX_ACK_DEADLINE"] == "10m"
    assert config["NERVE_LOG_FORMAT"] == "json"
    assert {k: v for k, v in config.items() if k.startswith("NERVE_CONNECTIONS__")} == {
        "NERVE_CONNECTIONS__MAX_CONCURRENT_STREAMS": "256",
        "NERVE_CONNECTIONS__MAX_STREAMS_PER_PRINCIPAL": "1024",
        "NERVE_CONNECTIONS__PUBLISH_RATE_PER_PRINCIPAL": "0",
        "NERVE_CONNECTIONS__PUBLISH_BURST": "1000",
        "NERVE_CONNECTIONS__STREAM_OPEN_TIMEOUT": "10s",
        "NERVE_CONNECTIONS__KEEPALIVE_INTERVAL": "30s",
        "NERVE_CONNECTIONS__KEEPALIVE_TIMEOUT": "10s",
    }
    ha = render(HA).config
    assert ha["NERVE_CONNECTIONS__PUBLISH_RATE_PER_PRINCIPAL"] == "500"
    assert ha["NERVE_CONNECTIONS__PUBLISH_BURST"] == "2000"


def test_config_change_rolls_the_pods() -> None:
    def checksum(m: Manifests) -> str:
        return m.deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(render()) != checksum(render(sets=["config.logLevel=debug"]))


def test_extra_env_and_tracing() -> None:
    m = render(PRODUCTION)
    assert m.env["OTEL_BSP_MAX_QUEUE_SIZE"] == {"name": "OTEL_BSP_MAX_QUEUE_SIZE", "value": "4096"}
    assert m.config["NERVE_TRACING__OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert m.config["NERVE_LOG_LEVEL"] == "nerve=debug,info"
    assert m.config["NERVE_LIMITS__MAX_EVENT_BYTES"] == "2097152"
    assert "NERVE_TRACING__OTLP_ENDPOINT" not in render().config


def test_metrics_port_only_when_enabled() -> None:
    off = render()
    assert [p["name"] for p in off.container["ports"]] == ["grpc", "health"]
    assert not any(k.startswith("NERVE_METRICS__") for k in off.config)

    on = render(HA)
    assert {p["name"]: p["containerPort"] for p in on.container["ports"]} == {
        "grpc": 50051,
        "health": 8081,
        "metrics": 9090,
    }
    assert on.config["NERVE_METRICS__LISTEN"] == "0.0.0.0:9090"
    service_ports = {p["name"]: p for p in on.named("Service", f"{FULLNAME}-metrics")["spec"]["ports"]}
    assert service_ports["metrics"]["targetPort"] == "metrics"
    assert [s["metadata"]["name"] for s in off.all("Service")] == [FULLNAME]
    annotations = on.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9090"

    no_scrape = render(EMBEDDED_PVC)
    assert "prometheus.io/scrape" not in no_scrape.deployment["spec"]["template"]["metadata"]["annotations"]


@pytest.mark.parametrize("service_type", ["ClusterIP", "NodePort", "LoadBalancer"])
def test_metrics_port_is_never_published_outside_the_cluster(service_type: str) -> None:
    """/metrics is unauthenticated and its labels name every tenant's event types and groups: it is on a
    ClusterIP Service of its own, never on the gRPC Service, whatever type that one has."""
    m = render(sets=[*PROD_SETS, "metrics.enabled=true", f"service.type={service_type}"])
    for service in m.all("Service"):
        ports = service["spec"]["ports"]
        if service["spec"].get("type", "ClusterIP") != "ClusterIP":
            assert not [p for p in ports if p["targetPort"] == "metrics" or p["port"] == 9090], service
    (scraped,) = [s for s in m.all("Service") if any(p["targetPort"] == "metrics" for p in s["spec"]["ports"])]
    assert scraped["metadata"]["name"] == f"{FULLNAME}-metrics"
    assert scraped["spec"]["type"] == "ClusterIP"
    assert scraped["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP", "appProtocol": "http"}
    ]
    assert scraped["spec"]["selector"] == m.deployment["spec"]["selector"]["matchLabels"]
    grpc = m.named("Service", FULLNAME)
    assert grpc["spec"]["type"] == service_type
    assert [p["targetPort"] for p in grpc["spec"]["ports"]] == ["grpc"]


def test_service_port_may_equal_the_metrics_port() -> None:
    """The gRPC Service port and the metrics port are on different Services: no Service gets one port twice
    (which the API refuses)."""
    m = render(sets=[*PROD_SETS, "metrics.enabled=true", "service.port=9090"])
    assert len(m.all("Service")) == 2
    for service in m.all("Service"):
        ports = [(p["port"], p["protocol"]) for p in service["spec"]["ports"]]
        assert len(ports) == len(set(ports)), service


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["healthPort=50051"], "healthPort (50051) must differ from containerPort (50051)"),
        (["containerPort=8081"], "healthPort (8081) must differ from containerPort (8081)"),
        (["metrics.enabled=true", "metrics.port=50051"], "metrics.port (50051) must differ from containerPort (50051)"),
        (["metrics.enabled=true", "containerPort=9090"], "metrics.port (9090) must differ from containerPort (9090)"),
        (["metrics.enabled=true", "metrics.port=8081"], "metrics.port (8081) must differ from healthPort (8081)"),
        (["metrics.enabled=true", "healthPort=9090"], "metrics.port (9090) must differ from healthPort (9090)"),
    ],
)
def test_every_pair_of_container_ports_must_differ(sets: list[str], message: str) -> None:
    assert message in render_error(sets=sets)


# ---------------------------------------------------------------- service, image, storage


def test_service_speaks_grpc(any_values: tuple[str, ...]) -> None:
    m = render(*any_values)
    service = m.named("Service", FULLNAME)
    (grpc,) = service["spec"]["ports"]
    assert grpc["targetPort"] == "grpc"
    if m.config.get("NERVE_TLS__CERT_FILE"):
        assert grpc["name"] == "tls" and "appProtocol" not in grpc
    else:
        assert grpc["name"] == "grpc" and grpc["appProtocol"] == "grpc"
    assert service["spec"]["selector"] == m.deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("values", [(SECURE,), (PRODUCTION,), (HA,), ()])
def test_tls_port_is_not_declared_plaintext_grpc(values: tuple[str, ...]) -> None:
    """Meshes read `appProtocol: grpc`, and a port name starting with `grpc` (Istio), as plaintext HTTP/2:
    with TLS on the server's own port they would try to parse the TLS bytes as HTTP/2."""
    sets = [] if values else TLS_SETS
    (port,) = render(*values, sets=sets).named("Service", FULLNAME)["spec"]["ports"]
    assert port.get("appProtocol") not in ("grpc", "http", "http2", "kubernetes.io/h2c"), port
    assert not port["name"].startswith(("grpc", "http")), port
    assert port["targetPort"] == "grpc"
    plain = render().named("Service", FULLNAME)["spec"]["ports"][0]
    assert (plain["name"], plain["appProtocol"]) == ("grpc", "grpc")


def test_image_tag_and_digest() -> None:
    assert render(sets=["image.tag=1.2.3"]).container["image"] == "ghcr.io/nerve-bus/nerve:1.2.3"
    digest = "sha256:" + "0123456789abcdef" * 4
    assert render(EMBEDDED_PVC).container["image"] == f"ghcr.io/nerve-bus/nerve@{digest}"


def test_persistent_volume_claim() -> None:
    pvc = render(EMBEDDED_PVC).one("PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    no_class = render(sets=["persistence.storageClass=-"]).one("PersistentVolumeClaim")
    assert no_class["spec"]["storageClassName"] == ""
    assert "storageClassName" not in render().one("PersistentVolumeClaim")["spec"]

    existing = render(sets=["persistence.existingClaim=my-claim"])
    assert existing.maybe("PersistentVolumeClaim") is None
    volumes = {v["name"]: v for v in existing.pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "my-claim"}


def test_existing_service_account() -> None:
    m = render(EMBEDDED_EPHEMERAL)
    assert m.maybe("ServiceAccount") is None
    assert m.pod["serviceAccountName"] == "nerve-runner"


# ---------------------------------------------------------------- HPA, PDB, NetworkPolicy


def test_hpa_owns_the_replica_count() -> None:
    m = render(HA)
    assert "replicas" not in m.deployment["spec"]
    hpa = m.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    targets = {
        x["resource"]["name"]: x["resource"]["target"]["averageUtilization"]
        for x in hpa["spec"]["metrics"]
    }
    assert targets == {"cpu": 60, "memory": 80}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_pdb() -> None:
    pdb = render(HA).one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 2 and "maxUnavailable" not in pdb["spec"]
    pdb = render(sets=[*PROD_SETS, "podDisruptionBudget.enabled=true"]).one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    selector = render(sets=PROD_SETS).deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector


def test_network_policy() -> None:
    m = render(HA)
    policy = m.one("NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == m.deployment["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    grpc, health, metrics = spec["ingress"]
    assert grpc["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert len(grpc["from"]) == 2
    # the kubelet probes from the node: the health port is open to every source
    assert health == {"ports": [{"port": "health", "protocol": "TCP"}]}
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    dns, backends = spec["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert {p["port"] for p in backends["ports"]} == {5432, 6379}

    open_policy = render(EMBEDDED_EPHEMERAL).one("NetworkPolicy")["spec"]
    assert open_policy["ingress"] == [
        {"ports": [{"port": "grpc", "protocol": "TCP"}]},
        {"ports": [{"port": "health", "protocol": "TCP"}]},
    ]
    assert open_policy["egress"] == []  # egress on, no DNS, no rules: nothing leaves


def test_recreate_update_strategy_in_production() -> None:
    """`updateStrategy.type=Recreate` stops every old pod (and waits for it to end) before a new one
    starts: the README's stop-first upgrade across incompatible builds."""
    strategy = render(sets=[*PROD_SETS, "replicaCount=3", "updateStrategy.type=Recreate"]).deployment["spec"]["strategy"]
    assert strategy == {"type": "Recreate"}
    rolling = render(sets=[*PROD_SETS, "updateStrategy.type=RollingUpdate"]).deployment["spec"]["strategy"]
    assert rolling == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert render(sets=["updateStrategy.type=RollingUpdate"]).deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "/updateStrategy/type" in render_error(sets=[*PROD_SETS, "updateStrategy.type=OnDelete"])
    readme = (CHART / "README.md").read_text()
    assert "--set updateStrategy.type=Recreate" in readme
    assert "updateStrategy.maxUnavailable=100%" not in readme


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["replicaCount=3", "podDisruptionBudget.minAvailable=3"], "podDisruptionBudget.minAvailable (3) is not below replicaCount (3)"),
        (["replicaCount=3", "podDisruptionBudget.minAvailable=5"], "podDisruptionBudget.minAvailable (5) is not below replicaCount (3)"),
        (
            ["replicaCount=5", "autoscaling.enabled=true", "autoscaling.minReplicas=2", "podDisruptionBudget.minAvailable=2"],
            "podDisruptionBudget.minAvailable (2) is not below autoscaling.minReplicas (2)",
        ),
        (["replicaCount=3", "podDisruptionBudget.maxUnavailable=0"], "podDisruptionBudget.maxUnavailable is 0"),
        (["replicaCount=3", "podDisruptionBudget.maxUnavailable=0%"], "podDisruptionBudget.maxUnavailable is 0%"),
        (["replicaCount=3", "podDisruptionBudget.minAvailable=100%"], "podDisruptionBudget.minAvailable is 100%"),
    ],
)
def test_pdb_that_blocks_every_drain_is_refused(sets: list[str], message: str) -> None:
    assert message in render_error(sets=[*PROD_SETS, "podDisruptionBudget.enabled=true", *sets])


@pytest.mark.parametrize(
    "sets",
    [
        ["replicaCount=3", "podDisruptionBudget.minAvailable=2"],
        ["replicaCount=3", "podDisruptionBudget.minAvailable=50%"],
        ["replicaCount=3", "podDisruptionBudget.maxUnavailable=1"],
        # maxUnavailable is not used when minAvailable is set
        ["replicaCount=3", "podDisruptionBudget.minAvailable=1", "podDisruptionBudget.maxUnavailable=0"],
        ["replicaCount=1", "autoscaling.enabled=true", "autoscaling.minReplicas=3", "podDisruptionBudget.minAvailable=2"],
    ],
)
def test_pdb_that_lets_a_drain_through_renders(sets: list[str]) -> None:
    assert render(sets=[*PROD_SETS, "podDisruptionBudget.enabled=true", *sets]).maybe("PodDisruptionBudget")


def test_rolling_update_percentages() -> None:
    strategy = render(HA).deployment["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}}


def test_topology_spread_gets_the_selector() -> None:
    m = render(HA)
    (constraint,) = m.pod["topologySpreadConstraints"]
    assert constraint["labelSelector"]["matchLabels"] == m.deployment["spec"]["selector"]["matchLabels"]
    assert constraint["topologyKey"] == "topology.kubernetes.io/zone"


# ---------------------------------------------------------------- refused configurations


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["replicaCount=2"],
            "mode=embedded keeps the event store in one SQLite file, so it runs exactly one replica,"
            " but replicaCount is 2",
        ),
        (["autoscaling.enabled=true"], "mode=embedded runs exactly one replica, so it cannot be autoscaled"),
        (["podDisruptionBudget.enabled=true"], "a PodDisruptionBudget would block every node drain"),
        (["postgres.existingSecret=pg"], "set mode=production"),
        (["mode=production"], "mode=production needs both Postgres and Redis: set postgres.existingSecret"),
        (["mode=production", "postgres.existingSecret=pg"], "set redis.existingSecret"),
        (
            [*PROD_SETS, "postgres.url=postgres://x"],
            "set only one of postgres.url and postgres.existingSecret",
        ),
        (
            [*PROD_SETS, "autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=3"],
            "greater than autoscaling.maxReplicas",
        ),
        ([*PROD_SETS, "autoscaling.enabled=true", "resources.requests=null"], "set resources.requests.cpu"),
        ([*PROD_SETS, "metrics.enabled=true", "metrics.port=50051"], "metrics.port (50051) must differ"),
        (["healthPort=50051"], "healthPort (50051) must differ from containerPort"),
        (
            ["config.shutdownTimeout=1m"],
            "config.shutdownDelay (5s) + config.shutdownTimeout (1m) must leave at least 5s of"
            " terminationGracePeriodSeconds (30)",
        ),
        (
            ["config.shutdownDelay=10s", "config.shutdownTimeout=14s500ms", "terminationGracePeriodSeconds=29"],
            "must leave at least 5s of terminationGracePeriodSeconds (29)",
        ),
        (["terminationGracePeriodSeconds=0"], "must leave at least 5s of terminationGracePeriodSeconds (0)"),
        (["metrics.enabled=true", "metrics.port=8081"], "metrics.port (8081) must differ from healthPort"),
        (["metrics.serviceMonitor.enabled=true"], "metrics.serviceMonitor.enabled needs metrics.enabled=true"),
        (["tls.enabled=true"], "tls.enabled needs tls.existingSecret"),
        (["tls.existingSecret=t"], "tls.existingSecret is set but tls.enabled=false"),
        (["tls.clientCA.existingSecret=ca"], "tls.clientCA.existingSecret (mTLS) needs TLS"),
        (
            ["tls.enabled=true", "tls.existingSecret=t", "tls.clientCA.existingSecret=ca", "tls.clientAuth=optional"],
            "tls.clientAuth=optional lets clients without a certificate in",
        ),
        (["auth.jwt.enabled=true", "auth.jwt.existingSecret=j"], "needs auth.jwt.issuer and auth.jwt.audience"),
        (["auth.jwt.enabled=true", "auth.jwt.issuer=i", "auth.jwt.audience=a"], "needs auth.jwt.existingSecret"),
        (
            # no key by default: the chart names no Secret key the Secret might not hold
            ["auth.jwt.enabled=true", "auth.jwt.issuer=i", "auth.jwt.audience=a", "auth.jwt.existingSecret=j"],
            "auth.jwt.enabled needs a key",
        ),
        (
            ["auth.jwt.enabled=true", "auth.jwt.issuer=i", "auth.jwt.audience=a", "auth.jwt.existingSecret=j",
             "auth.jwt.jwksKey=jwks.json", "auth.jwt.algorithms={HS256}"],
            "HS* algorithm but auth.jwt.hsSecretKey is empty",
        ),
        (
            ["auth.policy.existingConfigMap=p", "auth.policy.inline=x"],
            "set only one of auth.policy.existingConfigMap and auth.policy.inline",
        ),
        # the server refuses a policy it cannot apply to anyone ("auth.policy_file needs a way to identify
        # callers") and would crash-loop
        (["auth.policy.inline=x = 1"], "auth.policy.existingConfigMap or auth.policy.inline is set, but no caller"),
        (["auth.policy.existingConfigMap=p"], "no caller can be identified"),
        (
            ["tls.enabled=true", "tls.existingSecret=t", "auth.policy.inline=x = 1"],  # TLS alone identifies nobody
            "Configure mTLS (tls.enabled, tls.existingSecret, tls.clientCA.existingSecret) or JWT",
        ),
        (
            [*PROD_SETS, "auth.allowInsecure=false", "auth.policy.existingConfigMap=p"],
            "no caller can be identified",
        ),
    ],
)
def test_impossible_values_fail_with_a_clear_message(sets: list[str], message: str) -> None:
    assert message in render_error(sets=sets)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        # the server's Config::check: "health_check_interval must be positive"
        (["config.healthCheckInterval=0s"], "config.healthCheckInterval (0s) must be positive"),
        (["config.healthCheckInterval=0ms"], "config.healthCheckInterval (0ms) must be positive"),
        (["config.healthCheckInterval=0m0s"], "config.healthCheckInterval (0m0s) must be positive"),
        # "metrics.group_sample_interval must be positive" (checked whether metrics are on or not)
        (["metrics.enabled=true", "metrics.groupSampleInterval=0s"], "metrics.groupSampleInterval (0s) must be positive"),
        (["metrics.groupSampleInterval=0 seconds"], "metrics.groupSampleInterval (0 seconds) must be positive"),
        # SQLite writes its database: a read-only claim cannot hold it (the schema's enum leaves it out)
        (["persistence.accessModes={ReadOnlyMany}"], "at '/persistence/accessModes/0': value must be one of"),
        (["persistence.accessModes={ReadWriteOnce,ReadOnlyMany}"], "at '/persistence/accessModes/1'"),
        # the chart's own mounts: /tmp (SQLite's temporary files) and /etc/nerve/*
        (["persistence.mountPath=/tmp"], "persistence.mountPath (/tmp) overlaps the chart's mount /tmp"),
        (["persistence.mountPath=/tmp/"], "persistence.mountPath (/tmp/) overlaps the chart's mount /tmp"),
        (["persistence.mountPath=/tmp/nerve"], "persistence.mountPath (/tmp/nerve) overlaps the chart's mount /tmp"),
        (["persistence.mountPath=/"], "persistence.mountPath (/) overlaps the chart's mount /tmp"),
        (["persistence.mountPath=/etc/nerve"], "persistence.mountPath (/etc/nerve) overlaps the chart's mount /etc/nerve/tls"),
        (["persistence.mountPath=/etc/nerve/jwt"], "persistence.mountPath (/etc/nerve/jwt) overlaps the chart's mount /etc/nerve/jwt"),
        # the API refuses a rolling update that may neither add nor remove a pod
        (
            [*PROD_SETS, "updateStrategy.maxSurge=0", "updateStrategy.maxUnavailable=0"],
            "updateStrategy.maxSurge (0) and updateStrategy.maxUnavailable (0) are both zero",
        ),
        (
            [*PROD_SETS, "updateStrategy.maxSurge=0%", "updateStrategy.maxUnavailable=0"],
            "updateStrategy.maxSurge (0%) and updateStrategy.maxUnavailable (0) are both zero",
        ),
    ],
)
def test_values_the_server_or_the_api_refuse_are_refused(sets: list[str], message: str) -> None:
    assert message in render_error(sets=sets)


@pytest.mark.parametrize(
    "sets",
    [
        ["config.healthCheckInterval=500ms"],
        ["metrics.enabled=true", "metrics.groupSampleInterval=10s"],
        ["persistence.accessModes={ReadWriteOncePod}"],
        ["persistence.mountPath=/data"],
        ["persistence.mountPath=/tmpdata"],
        ["persistence.mountPath=/etc/nerve-data"],
        [*PROD_SETS, "updateStrategy.maxSurge=0", "updateStrategy.maxUnavailable=1"],
        [*PROD_SETS, "updateStrategy.maxSurge=10%", "updateStrategy.maxUnavailable=0"],
        # Recreate has no rolling update to check
        [*PROD_SETS, "updateStrategy.type=Recreate", "updateStrategy.maxSurge=0", "updateStrategy.maxUnavailable=0"],
    ],
)
def test_neighbours_of_refused_values_render(sets: list[str]) -> None:
    render(sets=sets)


def test_embedded_replicas_fail_even_from_a_values_file(tmp_path: Path) -> None:
    f = tmp_path / "two.yaml"
    f.write_text("replicaCount: 2\n")
    assert "runs exactly one replica" in render_error(f)


@pytest.mark.parametrize(
    "sets",
    [
        ["mode=replicated"],
        ["unknownKey=1"],
        ["config.bus.defaultAckDeadline=soon"],
        ["config.logFormat=xml"],
        ["postgres.url=mysql://x"],
        ["redis.keyPrefix=123"],
        ["redis.keyPrefix="],
        ["redis.keyPrefix=nerve prod"],
        ["redis.keyPrefix=nerve/prod"],
        ["redis.keyPrefix=nerve{prod}"],
        ["redis.keyPrefix=nérve"],
        ["image.digest=latest"],
        ["config.limits.unknown=1"],
        ["config.connections.unknown=1"],
        ["config.connections.streamOpenTimeout=soon"],
        ["tls.clientAuth=maybe"],
        ["tls.handshakeTimeout=soon"],
        ["auth.jwt.leeway=2m"],
        ["auth.jwt.leeway=61s"],
        ["auth.jwt.leeway=500ms"],
        ["auth.jwt.algorithms={none}"],
        ["auth.jwt.algorithms={RS256,RS256}"],
        ["auth.allowInsecure=maybe"],
        ["tls.existingSecret=Not_A_Name"],
        ["metrics.serviceMonitor.interval=soon"],
        ["healthPort=0"],
    ],
)
def test_schema_refuses_bad_values(sets: list[str]) -> None:
    assert "values don't meet the specifications of the schema" in render_error(sets=sets)


# ---------------------------------------------------------------- NOTES, README, schema


def test_notes_show_grpcurl(tmp_path: Path) -> None:
    notes = render_notes(tmp_path)
    assert f"kubectl --namespace ns port-forward service/{FULLNAME} 50051:50051" in notes
    assert "grpcurl -plaintext localhost:50051 list" in notes
    assert "embedded mode" in notes


def test_notes_production(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, HA)
    assert "3 to 12 replicas (HPA)" in notes
    assert "advisory lock" in notes
    assert "/metrics" in notes


def test_notes_warn_without_persistence(tmp_path: Path) -> None:
    assert "WARNING" in render_notes(tmp_path, EMBEDDED_EPHEMERAL)


def test_every_value_is_documented_and_in_the_readme_table() -> None:
    docs = documented()
    keys = {d.key for d in docs}
    values = yaml.safe_load(VALUES_FILE.read_text())
    for leaf in leaves(values):
        dotted = [".".join(leaf[:i]) for i in range(1, len(leaf) + 1)]
        assert any(k in keys for k in dotted), f"{'.'.join(leaf)} has no `# --` comment"
    readme = (CHART / "README.md").read_text()
    assert table(docs) in readme, (
        "helm/nerve/README.md's values table differs from values.yaml: python3 helm/tests/values_doc.py prints it"
    )


def _readme_commands(program: str) -> list[list[str]]:
    """The commands of the README's sh blocks that run `program`, continuation lines joined, split as the
    shell splits them."""
    readme = (CHART / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(program + " "):
                commands.append(shlex.split(line))
    return commands


def _install_sets(command: list[str]) -> list[str]:
    """`helm install` flags as --set values (a --set-file gets a stand-in for the file's text)."""
    sets = []
    for flag, value in zip(command, command[1:]):
        if flag == "--set":
            sets.append(value)
        elif flag == "--set-file":
            sets.append(value.split("=", 1)[0] + "=x = 1")
    return sets


def _created_secret_keys() -> set[tuple[str, str]]:
    """(Secret, key) pairs that the README's `kubectl create secret` commands create."""
    created = set()
    for command in _readme_commands("kubectl"):
        if command[1:3] != ["create", "secret"]:
            continue
        kind, name = command[3], command[4]
        if kind == "tls":
            created |= {(name, "tls.crt"), (name, "tls.key")}
        for arg in command[5:]:
            flag, _, rest = arg.partition("=")
            if flag in ("--from-literal", "--from-file"):
                created.add((name, rest.split("=", 1)[0]))
    return created


def test_readme_install_examples_render_and_create_the_secret_keys_they_read() -> None:
    """Every `helm install` of the README renders, and every Secret key its pods read (backend URLs, TLS,
    client CA and JWT key files) is created by a `kubectl create secret` of the README."""
    installs = [c for c in _readme_commands("helm") if c[1] == "install"]
    assert len(installs) >= 4
    created = _created_secret_keys()
    for command in installs:
        m = render(sets=_install_sets(command))
        read = {
            (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in m.env.values()
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        secret_dirs = {
            mount["mountPath"]: _volumes(m)[name]["secret"]["secretName"]
            for name, mount in _mounts(m).items()
            if "secret" in _volumes(m)[name]
        }
        for paths in _file_settings(m.config).values():
            for path in paths:
                directory, _, key = path.rpartition("/")
                if directory in secret_dirs:
                    read.add((secret_dirs[directory], key))
        assert read <= created, f"{shlex.join(command)} reads Secret keys no command creates: {read - created}"


def test_readme_shows_building_and_pushing_the_image() -> None:
    """No pipeline publishes the image: the README builds and pushes it, and installs the pushed one."""
    pushed = [c[2] for c in _readme_commands("docker") if c[1] == "push"]
    built = [c[c.index("-t") + 1] for c in _readme_commands("docker") if c[1] == "build"]
    assert pushed and pushed == built
    images = {
        render(sets=_install_sets(c)).container["image"]
        for c in _readme_commands("helm")
        if c[1] == "install" and any(s.startswith("image.repository=") for s in _install_sets(c))
    }
    assert images == set(pushed)


def test_health_port_commands_do_not_rely_on_reflection(tmp_path: Path) -> None:
    """The health listener has no reflection: grpcurl against it needs -proto (README and NOTES)."""
    readme = [shlex.join(c) for c in _readme_commands("grpcurl")]
    notes = [line.strip() for line in render_notes(tmp_path).splitlines() if line.strip().startswith("grpcurl")]
    health = [c for c in readme + notes if "localhost:8081" in c]
    assert len(health) >= 4
    for command in health:
        assert " -proto health.proto " in command, command


def test_schema_covers_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load(VALUES_FILE.read_text())

    def check(node: dict, value: object, path: str) -> None:
        if node.get("type") == "object" and node.get("additionalProperties") is False:
            assert isinstance(value, dict), path
            props = node["properties"]
            for key, sub in value.items():
                assert key in props, f"{path}.{key} is not in values.schema.json"
                check(props[key], sub, f"{path}.{key}")
            for key in props:
                assert key in value or key == "global", f"values.schema.json has {path}.{key}, values.yaml not"
        assert "description" in node or path == "", f"{path} has no description in values.schema.json"

    check(schema, values, "")


# ---------------------------------------------------------------- TLS, mTLS, JWT, policy, insecure mode

JWT_SETS = [
    "auth.jwt.enabled=true",
    "auth.jwt.issuer=https://issuer",
    "auth.jwt.audience=nerve",
    "auth.jwt.existingSecret=jwt-keys",
    "auth.jwt.jwksKey=jwks.json",
]
TLS_SETS = ["tls.enabled=true", "tls.existingSecret=server-tls"]
MTLS_SETS = [*TLS_SETS, "tls.clientCA.existingSecret=client-ca"]


def _mounts(m: Manifests) -> dict[str, dict]:
    return {v["name"]: v for v in m.container.get("volumeMounts", [])}


def _volumes(m: Manifests) -> dict[str, dict]:
    return {v["name"]: v for v in m.pod.get("volumes", [])}


def _file_settings(config: dict[str, str]) -> dict[str, list[str]]:
    """NERVE_*_FILE(S) settings and the paths they name."""
    return {k: v.split(",") for k, v in config.items() if k.endswith(("_FILE", "_FILES"))}


def test_files_live_in_read_only_directory_mounts(any_values: tuple[str, ...]) -> None:
    """Every file setting points inside a read-only Secret/ConfigMap volume mounted as a whole directory
    (subPath mounts are never updated, so rotated certificates and edited policies would not arrive)."""
    m = render(*any_values)
    mounts, volumes = _mounts(m), _volumes(m)
    for mount in mounts.values():
        assert "subPath" not in mount and "subPathExpr" not in mount, mount["name"]
        source = volumes[mount["name"]]
        if "secret" in source or "configMap" in source:
            assert mount["readOnly"] is True, mount["name"]
            assert mount["mountPath"].startswith("/etc/nerve/"), mount["name"]
            assert "items" not in source.get("secret", source.get("configMap")), mount["name"]
    for setting, paths in _file_settings(m.config).items():
        for path in paths:
            directory, _, name = path.rpartition("/")
            matching = [x for x in mounts.values() if x["mountPath"] == directory]
            assert len(matching) == 1, f"{setting}={path} is not in a mounted directory"
            assert matching[0]["readOnly"] is True, setting
            assert set(volumes[matching[0]["name"]]) & {"secret", "configMap"}, setting
            assert name, setting


def test_tls_mtls_jwt_policy_wiring() -> None:
    m = render(SECURE)
    config, mounts, volumes = m.config, _mounts(m), _volumes(m)
    assert {k: mounts[k]["mountPath"] for k in ("tls", "client-ca", "jwt", "policy")} == {
        "tls": "/etc/nerve/tls",
        "client-ca": "/etc/nerve/client-ca",
        "jwt": "/etc/nerve/jwt",
        "policy": "/etc/nerve/policy",
    }
    assert volumes["tls"]["secret"] == {"secretName": "nerve-tls", "defaultMode": 0o440}
    assert volumes["client-ca"]["secret"] == {"secretName": "nerve-client-ca", "defaultMode": 0o440}
    assert volumes["jwt"]["secret"] == {"secretName": "nerve-jwt", "defaultMode": 0o440}
    assert volumes["policy"]["configMap"] == {"name": f"{FULLNAME}-policy"}

    assert config["NERVE_TLS__CERT_FILE"] == "/etc/nerve/tls/tls.crt"
    assert config["NERVE_TLS__KEY_FILE"] == "/etc/nerve/tls/tls.key"
    assert config["NERVE_TLS__CLIENT_CA_FILE"] == "/etc/nerve/client-ca/ca.crt"
    assert config["NERVE_TLS__CLIENT_AUTH"] == "optional"
    assert config["NERVE_TLS__HANDSHAKE_TIMEOUT"] == "10s"
    assert config["NERVE_AUTH__JWT__ISSUER"] == "https://issuer.example.com"
    assert config["NERVE_AUTH__JWT__AUDIENCE"] == "nerve-bus"
    assert config["NERVE_AUTH__JWT__ALGORITHMS"] == "ES256,HS256"
    assert config["NERVE_AUTH__JWT__JWKS_FILE"] == "/etc/nerve/jwt/jwks.json"
    assert config["NERVE_AUTH__JWT__HS_SECRET_FILE"] == "/etc/nerve/jwt/hs-secret"
    assert "NERVE_AUTH__JWT__PUBLIC_KEY_FILES" not in config
    assert config["NERVE_AUTH__JWT__LEEWAY"] == "30s"
    assert config["NERVE_AUTH__JWT__MAX_TOKEN_BYTES"] == "4096"
    assert config["NERVE_AUTH__JWT__TENANT_CLAIM"] == ""
    assert config["NERVE_AUTH__POLICY_FILE"] == "/etc/nerve/policy/policy.toml"
    assert config["NERVE_AUTH__RELOAD_CHECK_INTERVAL"] == "5s"
    assert config["NERVE_INSECURE"] == "false"

    (policy,) = [c for c in m.all("ConfigMap") if c["metadata"]["name"] == f"{FULLNAME}-policy"]
    assert set(policy["data"]) == {"policy.toml"}
    assert 'tenant = "orders"' in policy["data"]["policy.toml"]
    # no key material is copied into the chart's objects: only Secret references
    assert m.maybe("Secret") is None


def test_existing_client_ca_key_and_policy_config_map() -> None:
    m = render(PRODUCTION)
    assert m.config["NERVE_TLS__CLIENT_CA_FILE"] == "/etc/nerve/client-ca/bundle.pem"
    assert m.config["NERVE_TLS__CLIENT_AUTH"] == "required"
    assert m.config["NERVE_TLS__HANDSHAKE_TIMEOUT"] == "5s"
    assert m.config["NERVE_AUTH__POLICY_FILE"] == "/etc/nerve/policy/nerve-policy.toml"
    assert _volumes(m)["policy"]["configMap"] == {"name": "nerve-policy"}
    assert len(m.all("ConfigMap")) == 1  # the existing policy ConfigMap is referenced, not created
    assert not any(k.startswith("NERVE_AUTH__JWT__") for k in m.config)


def test_jwt_public_keys_and_tenant_claim() -> None:
    m = render(HA)
    assert m.config["NERVE_AUTH__JWT__PUBLIC_KEY_FILES"] == "/etc/nerve/jwt/rsa.pem,/etc/nerve/jwt/ec.pem"
    assert m.config["NERVE_AUTH__JWT__ALGORITHMS"] == "RS256,ES256"
    assert m.config["NERVE_AUTH__JWT__TENANT_CLAIM"] == "tenant"
    assert m.config["NERVE_AUTH__JWT__LEEWAY"] == "10s"
    assert "NERVE_AUTH__JWT__JWKS_FILE" not in m.config and "NERVE_AUTH__JWT__HS_SECRET_FILE" not in m.config
    assert "NERVE_TLS__CLIENT_CA_FILE" not in m.config and "client-ca" not in _volumes(m)
    assert _volumes(m)["jwt"]["secret"]["secretName"] == "nerve-jwt-keys"


def test_only_the_jwt_keys_given_are_read() -> None:
    """An HMAC-only or PEM-only setup must not name a JWKS file the Secret does not hold (the server would
    not start without it)."""
    base = [s for s in JWT_SETS if not s.startswith("auth.jwt.jwksKey=")]
    hmac = render(sets=[*base, "auth.jwt.algorithms={HS256}", "auth.jwt.hsSecretKey=hs-secret"]).config
    assert hmac["NERVE_AUTH__JWT__HS_SECRET_FILE"] == "/etc/nerve/jwt/hs-secret"
    assert "NERVE_AUTH__JWT__JWKS_FILE" not in hmac and "NERVE_AUTH__JWT__PUBLIC_KEY_FILES" not in hmac
    pem = render(sets=[*base, "auth.jwt.publicKeyKeys={key.pem}"]).config
    assert pem["NERVE_AUTH__JWT__PUBLIC_KEY_FILES"] == "/etc/nerve/jwt/key.pem"
    assert "NERVE_AUTH__JWT__JWKS_FILE" not in pem and "NERVE_AUTH__JWT__HS_SECRET_FILE" not in pem
    jwks = render(sets=JWT_SETS).config
    assert jwks["NERVE_AUTH__JWT__JWKS_FILE"] == "/etc/nerve/jwt/jwks.json"
    assert yaml.safe_load(VALUES_FILE.read_text())["auth"]["jwt"]["jwksKey"] == ""


def test_policy_with_authentication_renders() -> None:
    jwt = render(sets=[*JWT_SETS, "auth.policy.inline=x = 1"]).config
    assert jwt["NERVE_AUTH__POLICY_FILE"] == "/etc/nerve/policy/policy.toml"
    mtls = render(sets=[*MTLS_SETS, "auth.policy.existingConfigMap=p"]).config
    assert mtls["NERVE_AUTH__POLICY_FILE"] == "/etc/nerve/policy/policy.toml"


def test_strings_that_look_like_numbers_stay_strings(tmp_path: Path) -> None:
    """Quoted in a values file they are strings, accepted by the schema and rendered as given."""
    f = tmp_path / "numeric.yaml"
    f.write_text(
        'redis:\n  keyPrefix: "42"\nauth:\n  jwt:\n    audience: "123456"\n'
        "    enabled: true\n    issuer: https://issuer\n    existingSecret: jwt-keys\n    jwksKey: jwks.json\n"
    )
    m = render(f, sets=PROD_SETS)
    assert m.config["NERVE_REDIS__KEY_PREFIX"] == "42"
    assert m.config["NERVE_AUTH__JWT__AUDIENCE"] == "123456"
    assert render(sets=[*PROD_SETS, "redis.keyPrefix=team-a:nerve.v1_x"]).config["NERVE_REDIS__KEY_PREFIX"] == (
        "team-a:nerve.v1_x"
    )


def test_no_tls_or_auth_settings_by_default() -> None:
    m = render()
    # the audit log is kept with or without authentication (admin changes are audited)
    assert m.config.pop("NERVE_AUTH__AUDIT_RETENTION") == "30days"
    assert not any(k.startswith(("NERVE_TLS__", "NERVE_AUTH__")) for k in m.config)
    assert set(_mounts(m)) == {"data", "tmp"}


def test_tls_volumes_join_the_embedded_ones() -> None:
    m = render(sets=[*MTLS_SETS, *JWT_SETS])
    assert list(_mounts(m)) == ["data", "tmp", "tls", "client-ca", "jwt"]
    assert m.config["NERVE_STORE"] == "embedded"


def test_secret_mode_follows_fs_group() -> None:
    with_group = _volumes(render(sets=TLS_SETS))["tls"]["secret"]["defaultMode"]
    assert with_group == 0o440  # group-readable: kubelet gives the files the pod's fsGroup
    without = _volumes(render(sets=[*TLS_SETS, "podSecurityContext.fsGroup=null"]))["tls"]["secret"]
    assert without["defaultMode"] == 0o444


def test_policy_edits_do_not_restart_pods() -> None:
    """The server re-reads the mounted policy: changing it must not change the pod template."""
    a = render(SECURE).deployment["spec"]["template"]
    b = render(SECURE, sets=["auth.policy.inline=x = 1"]).deployment["spec"]["template"]
    assert a == b


@pytest.mark.parametrize(
    ("values", "sets", "insecure"),
    [
        ((), [], "true"),
        ((EMBEDDED_EPHEMERAL,), [], "true"),
        ((), TLS_SETS, "true"),  # TLS alone authenticates nobody
        ((), MTLS_SETS, "false"),
        ((), JWT_SETS, "false"),
        ((), [*JWT_SETS, "auth.allowInsecure=false"], "false"),
        ((PRODUCTION,), [], "false"),
        ((HA,), [], "false"),
        ((SECURE,), [], "false"),
    ],
)
def test_insecure_only_without_authentication(values: tuple[str, ...], sets: list[str], insecure: str) -> None:
    assert render(*values, sets=sets).config["NERVE_INSECURE"] == insecure


@pytest.mark.parametrize("sets", [["auth.allowInsecure=false"], [*TLS_SETS, "auth.allowInsecure=false"]])
def test_no_authentication_and_no_insecure_mode_is_refused(sets: list[str]) -> None:
    message = render_error(sets=sets)
    assert "no authentication is configured and auth.allowInsecure=false" in message
    assert "tls.clientCA.existingSecret" in message and "auth.jwt.enabled" in message
    assert "set auth.allowInsecure=true" in message


# ---------------------------------------------------------------- ServiceMonitor (no schema offline)


def test_service_monitor_shape() -> None:
    """kubernetes-validate has no schema for the CRD, so scripts/helm-check.sh leaves it to this test."""
    m = render(HA)
    sm = m.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["name"] == FULLNAME and sm["metadata"]["namespace"] == "ns"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = m.named("Service", f"{FULLNAME}-metrics")
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "the selector does not match the Service"
    # only the metrics Service: the gRPC one has no metrics port
    grpc_labels = m.named("Service", FULLNAME)["metadata"]["labels"]
    assert not selector.items() <= grpc_labels.items(), "the selector matches the gRPC Service too"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["ns"]}
    metrics_ports = [p for p in service["spec"]["ports"] if p["targetPort"] == "metrics"]
    assert len(metrics_ports) == 1
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {
        "port": metrics_ports[0]["name"],
        "path": "/metrics",
        "scheme": "http",
        "interval": "15s",
        "scrapeTimeout": "5s",
    }
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}


def test_service_monitor_defaults() -> None:
    sm = render(sets=[*PROD_SETS, "metrics.enabled=true", "metrics.serviceMonitor.enabled=true"]).one(
        "ServiceMonitor"
    )
    assert sm["spec"]["endpoints"][0]["interval"] == "30s"
    assert sm["spec"]["endpoints"][0]["scrapeTimeout"] == "10s"
    bare = render(
        sets=[
            *PROD_SETS,
            "metrics.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.interval=",
            "metrics.serviceMonitor.scrapeTimeout=",
        ]
    ).one("ServiceMonitor")
    assert set(bare["spec"]["endpoints"][0]) == {"port", "path", "scheme"}


# ---------------------------------------------------------------- NOTES with TLS and authentication


def _grpcurl_lines(notes: str) -> list[str]:
    """The grpcurl lines for the main port (the health port's line is always plaintext)."""
    return [line.strip() for line in notes.splitlines() if line.strip().startswith("grpcurl") and ":8081" not in line]


def test_notes_plaintext_without_tls(tmp_path: Path) -> None:
    notes = render_notes(tmp_path)
    lines = _grpcurl_lines(notes)
    assert lines and all(line.startswith("grpcurl -plaintext ") for line in lines)
    assert "WARNING: no authentication" in notes and "NERVE_INSECURE=true" in notes


def _health_lines(notes: str) -> list[str]:
    return [line.strip() for line in notes.splitlines() if "localhost:8081" in line]


def test_notes_health_commands_need_no_reflection(tmp_path: Path) -> None:
    """The health listener serves grpc.health.v1 without reflection: grpcurl needs health.proto."""
    notes = render_notes(tmp_path)
    check = "localhost:8081 grpc.health.v1.Health/Check"
    assert _health_lines(notes) == [
        f"""grpcurl -plaintext -proto health.proto -d '{{"service":"nerve.v1.Readiness"}}' {check}""",
        f"""grpcurl -plaintext -proto health.proto -d '{{"service":"nerve.v1.Liveness"}}' {check}""",
        "grpc_health_probe -addr=localhost:8081 -service=nerve.v1.Readiness",
    ]
    assert "https://raw.githubusercontent.com/grpc/grpc-proto/master/grpc/health/v1/health.proto" in notes
    # the entries of the enabled probes, as configured
    custom = _health_lines(render_notes(tmp_path / "custom", sets=["probes.readiness.service=", "probes.liveness.enabled=false"]))
    assert [line.split("-d ")[1].split(" ")[0] for line in custom if line.startswith("grpcurl")] == [
        """'{"service":""}'""",
        """'{"service":"nerve.v1.Liveness"}'""",
    ]
    assert custom[-1] == "grpc_health_probe -addr=localhost:8081 -service="


def test_notes_with_mtls_and_jwt(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, SECURE)
    lines = _grpcurl_lines(notes)
    assert len(lines) == 2
    for line in lines:
        assert "-plaintext" not in line
        assert "-cacert ca.crt" in line and "-cert client.crt -key client.key" in line
        assert '-H "authorization: Bearer $TOKEN"' in line
        assert f"-authority {FULLNAME}.ns.svc" in line
    assert "WARNING: no authentication" not in notes
    assert "kubectl --namespace ns get secret nerve-tls" in notes


def test_notes_with_tls_and_jwt_only(tmp_path: Path) -> None:
    lines = _grpcurl_lines(render_notes(tmp_path, HA))
    for line in lines:
        assert "-plaintext" not in line and "-cacert ca.crt" in line
        assert "-cert " not in line
        assert '-H "authorization: Bearer $TOKEN"' in line


def test_notes_with_mtls_only(tmp_path: Path) -> None:
    lines = _grpcurl_lines(render_notes(tmp_path, PRODUCTION))
    for line in lines:
        assert "-cert client.crt -key client.key" in line and "Bearer" not in line


def test_notes_jwt_without_tls(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, sets=JWT_SETS)
    lines = _grpcurl_lines(notes)
    assert all(line.startswith('grpcurl -plaintext -H "authorization: Bearer $TOKEN"') for line in lines)
    assert "JWTs travel in plaintext" in notes


def test_notes_warn_about_authentication_without_a_policy(tmp_path: Path) -> None:
    # every grant comes from the policy: authentication without one refuses every call
    without = render_notes(tmp_path / "without", HA, sets=["auth.policy.inline="])
    assert "authentication is on without a policy" in without
    assert "authentication is on without a policy" not in render_notes(tmp_path / "with", HA)


def test_an_otlp_endpoint_must_be_plaintext(tmp_path: Path) -> None:
    # the server's exporter has no TLS: an https:// endpoint would lose every span without an error
    message = render_error(sets=["tracing.otlpEndpoint=https://collector:4317"])
    assert "otlpEndpoint" in message, message
