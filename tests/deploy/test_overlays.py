"""The overlays as the seed's cluster would receive them: ``kubectl kustomize`` of each, validated strictly.

The seed (``../shared/seed/000_fd167ca47c95c2c8.txt``) is the staging cluster as it is: namespace
``staging``, Secrets ``django-staging`` / ``postgres-staging`` / ``redis-staging`` /
``rabbitmq-staging`` with the keys listed below, Traefik, cert-manager, GHCR with ``ghcr-secret``,
seven NetworkPolicies by name, quota 4/8Gi requests and 8/16Gi limits, PostgreSQL, Redis and
RabbitMQ already running in the namespace, production in namespace ``robson``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from config.env import resolve
from tests.deploy.test_manifests import (
    BACKUP_CRONJOBS, QUOTA, find, k8s_version, pod_spec, quantity, selects, workloads, worst_case,
)

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
IMAGE = "ghcr.io/ldamasio/rbs-backend-monolith"
SEED_POLICIES = {
    "default-deny-all-ingress",
    "default-deny-all-egress",
    "block-production",
    "allow-dns",
    "allow-internet",
    "allow-backend-to-deps",
    "allow-ingress-to-backend",
}
# ours beside the seed's: the backup pods' egress to the bucket (deploy/k8s/base/networkpolicy-backup.yaml)
OUR_POLICIES = {"allow-backup-to-bucket"}
# the seed's Secrets, keys as listed there (values made up)
SEED_SECRETS = {
    "django-staging": {
        "RBS_SECRET_KEY": "django-insecure-staging-0123456789abcdef0123456789abcdef",
        "SECRET_KEY": "django-insecure-staging-0123456789abcdef0123456789abcdef",
        "RBS_PG_DATABASE": "robson_staging",
        "RBS_PG_USER": "robson_staging",
        "RBS_PG_PASSWORD": "pg-password-32-characters-long-xx",
        "RBS_PG_HOST": "postgres-staging",
        "RBS_PG_PORT": "5432",
        "RBS_REDIS_URL": "redis://:redis-password-24-chars@redis-staging:6379/0",
        "RBS_RABBITMQ_URL": "amqp://robson_staging:rabbit-password-32-characters-x@rabbitmq-staging:5672",
        "BINANCE_API_KEY": "testnet-placeholder",
        "BINANCE_API_SECRET": "testnet-placeholder",
        "BINANCE_TESTNET": "true",
    },
    "postgres-staging": {
        "POSTGRES_USER": "robson_staging",
        "POSTGRES_PASSWORD": "pg-password-32-characters-long-xx",
        "POSTGRES_DB": "robson_staging",
    },
    "redis-staging": {"REDIS_PASSWORD": "redis-password-24-chars"},
    "rabbitmq-staging": {"RABBITMQ_DEFAULT_USER": "robson_staging", "RABBITMQ_DEFAULT_PASS": "rabbit-password-32-characters-x"},
}
# The seed's three datastores run in the namespace too and count against its quota. The seed
# gives their images, not their resources: each is counted at the LimitRange's defaults (what a
# container without resources gets): 100m/128Mi requested, 500m/512Mi limit.
SEED_DATASTORES = ("postgres-staging", "redis-staging", "rabbitmq-staging")
LIMIT_RANGE_DEFAULT = {"requests.cpu": Decimal("0.1"), "requests.memory": 128 * 2**20,
                       "limits.cpu": Decimal("0.5"), "limits.memory": 512 * 2**20}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")


def render(overlay: str) -> list[dict]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS / overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def params(overlay: str) -> dict:
    return yaml.safe_load((OVERLAYS / overlay / "params.yaml").read_text())["data"]


@pytest.fixture(scope="module")
def staging() -> list[dict]:
    return render("staging")


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return render("production")


def containers(doc):
    return pod_spec(doc)["containers"] + pod_spec(doc).get("initContainers", [])


def pod_environment(doc, container, secrets: dict[str, dict], config_map: dict) -> dict[str, str]:
    """The environment the kubelet gives ``container`` from ConfigMap and Secrets (envFrom, then env)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_map)
        else:
            env.update(secrets.get(source["secretRef"]["name"], {}))
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            if value is not None:
                env[entry["name"]] = value
    return env


@pytest.mark.parametrize("overlay", sorted(p.name for p in OVERLAYS.iterdir() if p.is_dir()))
def test_every_overlay_renders_and_validates_strictly(overlay):
    docs = render(overlay)
    assert docs
    version = k8s_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    # the local-config parameters are never emitted
    assert not [d for d in docs if d["metadata"]["name"] == "overlay-params"]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"} == SEED_POLICIES | OUR_POLICIES


def test_staging_is_the_seeds_namespace_image_and_pull_secret(staging):
    """Every pod pulls from GHCR with ghcr-secret; the application's image is the commit the main
    build promoted (sha-<40 hex>, deploy/scripts/promote.py), never a floating tag."""
    (tag,) = [i["newTag"] for i in yaml.safe_load((OVERLAYS / "staging" / "kustomization.yaml").read_text())["images"]
              if i["name"] == "stopmonitor"]
    assert re.fullmatch(r"sha-[0-9a-f]{40}", tag)
    assert {d["metadata"].get("namespace") for d in staging} == {"staging"}
    for doc in workloads(staging):
        assert pod_spec(doc)["imagePullSecrets"] == [{"name": "ghcr-secret"}], doc["metadata"]["name"]
        for container in containers(doc):
            if doc["metadata"]["name"] in BACKUP_CRONJOBS:
                assert container["image"].startswith(("ghcr.io/ldamasio/stopmonitor-postgres:v", "ghcr.io/ldamasio/stopmonitor-drill:v"))
            else:
                assert container["image"] == f"{IMAGE}:{tag}", doc["metadata"]["name"]
    assert find(staging, "ResourceQuota", "staging-quota")  # the seed's quota object, same values


def test_staging_web_is_backend_staging(staging):
    """The seed's commands: kubectl logs -n staging -l app=backend-staging, exec deployment/backend-staging,
    describe svc/ingress backend-staging."""
    web = find(staging, "Deployment", "backend-staging")
    assert web["spec"]["selector"] == {"matchLabels": {"app": "backend-staging"}}
    assert web["metadata"]["labels"]["app"] == "backend-staging"
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert labels["app"] == "backend-staging" and labels["app.kubernetes.io/component"] == "web"
    # -l app=backend-staging selects the web pods only
    for doc in workloads(staging):
        if doc is not web:
            assert not selects(web["spec"]["selector"], doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}))
    service = find(staging, "Service", "backend-staging")
    assert service["spec"]["selector"] == {"app": "backend-staging"}
    ingress = find(staging, "Ingress", "backend-staging")
    assert ingress["spec"]["ingressClassName"] == "traefik"
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == params("staging")["clusterIssuer"]
    assert ingress["metadata"]["annotations"]["traefik.ingress.kubernetes.io/router.entrypoints"] == "websecure"
    assert ingress["spec"]["tls"] == [{"hosts": ["api.staging.rbx.ia.br"], "secretName": "backend-staging-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "api.staging.rbx.ia.br"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "backend-staging", "port": {"name": "http"}}
    data = find(staging, "ConfigMap", "stopmonitor-config")["data"]
    assert data["ALLOWED_HOSTS"] == "api.staging.rbx.ia.br"
    assert data["CSRF_TRUSTED_ORIGINS"] == "https://api.staging.rbx.ia.br"


def test_the_issuer_is_a_parameter(tmp_path):
    """Changing params.yaml's clusterIssuer is all it takes (a copy of the overlay beside a copy of base)."""
    for folder in ("base", "components", "overlays"):
        shutil.copytree(ROOT / "deploy" / "k8s" / folder, tmp_path / folder)
    path = tmp_path / "overlays" / "staging" / "params.yaml"
    path.write_text(path.read_text().replace("clusterIssuer: letsencrypt-prod", "clusterIssuer: letsencrypt-staging"))
    result = subprocess.run(["kubectl", "kustomize", str(tmp_path / "overlays" / "staging")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    ingress = find([d for d in yaml.safe_load_all(result.stdout) if d], "Ingress", "backend-staging")
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt-staging"


# ours beside the seed's (deploy/k8s/base/secret.example.yaml): the roles' credentials (issue 17)
OWNER_SECRET = {
    "postgres-staging-owner": {
        "DATABASE_URL": "postgres://stopmonitor_owner:owner-password-32-characters-xxx@postgres-staging:5432/robson_staging",
        "PGUSER": "stopmonitor_owner",
        "PGPASSWORD": "owner-password-32-characters-xxx",
        "ADMIN_DATABASE_URL": "postgres://robson_staging:pg-password-32-characters-long-xx@postgres-staging:5432/robson_staging",
        "RUNTIME_PASSWORD": "runtime-password-32-characters-xx",
    },
}
RUNTIME_PODS = ("backend-staging", "stopmonitor-outbox-relay", "stopmonitor-monitor-stream", "stopmonitor-backfill",
                "stopmonitor-monitor-stops")


def test_staging_reads_the_seeds_secrets_and_reaches_its_services(staging):
    """Every workload's environment, built from the seed's Secrets (and ours, postgres-staging-owner)
    as the kubelet would, resolves to the seed's datastores: postgres-staging:5432/robson_staging,
    redis-staging, rabbitmq-staging. The runtime pods connect as stopmonitor_runtime, migrate as the
    owner, setup-roles as the bootstrap superuser (issue 17's roles); the backups reach the same server."""
    config_map = find(staging, "ConfigMap", "stopmonitor-config")["data"]
    secrets = SEED_SECRETS | OWNER_SECRET
    urls = {}
    for doc in workloads(staging):
        name = doc["metadata"]["name"]
        for container in containers(doc):
            refs = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
            keyed = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
            env = pod_environment(doc, container, secrets, config_map)
            if name in BACKUP_CRONJOBS:
                assert {"name": "stopmonitor-backup"} in refs
                assert keyed <= {"postgres-staging", "postgres-staging-owner", "stopmonitor-backup"}, name
                assert env.get("PGHOST", "postgres-staging") == "postgres-staging"
                assert env.get("BACKUP_SERVER_NAME", "staging") == "staging"
                continue
            assert refs == [{"name": "django-staging", "optional": True}], name
            if name == "stopmonitor-migrate":  # base's optional RBS_PG_* mapping: DATABASE_URL wins over it
                keyed -= {"stopmonitor-postgres-app"}
            assert keyed <= {"postgres-staging", "postgres-staging-owner"}, name
            config = resolve(lambda key: env.get(key, ""))
            urls[name] = config.database_url
            assert config.environment == "staging"
            assert config.redis_url.endswith("@redis-staging:6379/0")
            assert config.rabbitmq_url.endswith("@rabbitmq-staging:5672")
            assert config.venue == "binance-testnet" and config.binance_testnet is True
            assert config.allowed_hosts == ["api.staging.rbx.ia.br"]
    runtime = "postgres://stopmonitor_runtime:runtime-password-32-characters-xx@postgres-staging:5432/robson_staging"
    assert urls == {**{n: runtime for n in RUNTIME_PODS},
                    "stopmonitor-migrate": OWNER_SECRET["postgres-staging-owner"]["DATABASE_URL"],
                    "stopmonitor-setup-roles": OWNER_SECRET["postgres-staging-owner"]["ADMIN_DATABASE_URL"]}
    # the datastores behind those Services carry none of our labels: allow-backend-to-deps admits
    # the namespace's pods on their ports, from backend pods
    deps = find(staging, "NetworkPolicy", "allow-backend-to-deps")["spec"]
    assert deps["podSelector"] == {}
    assert deps["egress"][0]["to"] == [{"podSelector": {}}]
    assert {p["port"] for p in deps["egress"][0]["ports"]} == {5432, 6379, 5672}
    assert deps["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"stopmonitor.io/tier": "backend"}}}]


def test_block_production_names_robson_and_production_blocks_staging(staging, production):
    def excluded(docs):
        spec = find(docs, "NetworkPolicy", "block-production")["spec"]
        peers = [p for r in spec["ingress"] for p in r["from"]] + [p for r in spec["egress"] for p in r["to"]]
        names = set()
        for peer in peers:
            (by_name,) = [e for e in peer["namespaceSelector"]["matchExpressions"] if e["key"] == "kubernetes.io/metadata.name"]
            assert by_name["operator"] == "NotIn"
            names |= set(by_name["values"])
        return names

    assert excluded(staging) == {"robson"}
    assert excluded(production) == {"staging"}


def test_production_overlay(production):
    assert {d["metadata"].get("namespace") for d in production} == {"robson"}
    data = find(production, "ConfigMap", "stopmonitor-config")["data"]
    assert data["ENVIRONMENT"] == "production" and data["BINANCE_TESTNET"] == "false"
    assert data["EXCHANGE_VENUE"] == "binance"
    assert data["ALLOWED_HOSTS"] == "api.rbx.ia.br"
    web = find(production, "Deployment", "backend-production")
    assert web["spec"]["selector"] == {"matchLabels": {"app": "backend-production"}}
    ingress = find(production, "Ingress", "backend-production")
    assert ingress["spec"]["rules"][0]["host"] == "api.rbx.ia.br"
    for doc in workloads(production):
        assert pod_spec(doc)["imagePullSecrets"] == [{"name": "ghcr-secret"}]
        for container in containers(doc):
            refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
            if doc["metadata"]["name"] in BACKUP_CRONJOBS:
                assert "stopmonitor-backup" in refs and "django-staging" not in refs
                continue
            assert container["image"].startswith(IMAGE + ":")
            assert refs == ["django-production"]
    # nothing of staging's reaches production but the namespace block-production keeps out
    # (Secrets, the PostgreSQL Service and volume, the bucket's server name)
    rendered = yaml.safe_dump_all([d for d in production if d["metadata"]["name"] != "block-production"])
    assert "staging" not in rendered


def test_staging_quota_with_the_seeds_datastores(staging):
    """Worst case at one instant in namespace staging: every workload of the overlay (web + its surge
    pod, one CronJob pod, migrate and backfill Jobs, relays + their surge pod) plus the seed's three
    datastores at the LimitRange defaults, against the seed's quota."""
    quota = find(staging, "ResourceQuota", "staging-quota")["spec"]["hard"]
    hard = {k: quantity(v) for k, v in quota.items()}
    assert hard == {k: quantity(v) for k, v in QUOTA.items()}  # the seed's 4 / 8Gi / 8 / 16Gi
    total = worst_case(staging)
    ours = dict(total)
    for key in QUOTA:
        total[key] += LIMIT_RANGE_DEFAULT[key] * len(SEED_DATASTORES)
    for key in QUOTA:
        assert total[key] <= hard[key], f"{key}: {total[key]} > {hard[key]}"
    readme = (ROOT / "deploy" / "README.md").read_text()

    def row(label, values):
        cells = [f"{int(values['requests.cpu'] * 1000)}m", f"{int(values['requests.memory'] / 2**20)}Mi",
                 f"{int(values['limits.cpu'] * 1000)}m", f"{int(values['limits.memory'] / 2**20)}Mi"]
        return "| " + " | ".join([label, *cells]) + " |"

    assert row("stopmonitor (worst case above)", ours) in readme
    assert row("seed datastores × 3 (LimitRange defaults)", {k: v * 3 for k, v in LIMIT_RANGE_DEFAULT.items()}) in readme
    assert row("namespace staging, worst case", total) in readme
    assert row("headroom in staging", {k: hard[k] - total[k] for k in QUOTA}) in readme
