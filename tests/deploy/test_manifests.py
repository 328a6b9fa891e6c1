"""Offline checks of the deployment files: Kubernetes manifests, kustomization, quota, Docker, compose.

Every manifest is validated with kubernetes-validate (strict, the newest schema it ships). The
base's kustomization is "built" by reading its ``resources`` (no kubectl needed); when kubectl is
on PATH, ``kubectl kustomize`` must also succeed on it. The overlays: tests/deploy/test_overlays.py.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"
DOCKER = ROOT / "docker"

QUOTA = {"requests.cpu": "4", "requests.memory": "8Gi", "limits.cpu": "8", "limits.memory": "16Gi"}
LIMIT_RANGE = {
    "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
    "default": {"cpu": "500m", "memory": "512Mi"},
    "max": {"cpu": "2", "memory": "4Gi"},
}
API_HOSTS = {"api.staging.stopmonitor.example"}
RELAY = "stopmonitor-outbox-relay"
# issue 17: the backup CronJobs (tier backup), the suspended role setup Job, their two policies
BACKUP_CRONJOBS = ("stopmonitor-basebackup", "stopmonitor-pgdump", "stopmonitor-restore-drill")
SETUP_ROLES = "stopmonitor-setup-roles"
BACKUP_POLICIES = ("allow-backup-to-bucket",)
STREAM = "stopmonitor-monitor-stream"
# the relay's exec liveness probe, as the manifest must carry it (tests/deploy/test_outbox_relay.py runs it)
RELAY_LIVENESS_SCRIPT = """\
state=/tmp/outbox-relay-liveness
read -r _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ start _ < /proc/1/stat || exit 1
switches=
while read -r key value _; do
  if [ "$key" = "voluntary_ctxt_switches:" ]; then switches=$value; fi
done < /proc/1/status
[ -n "$switches" ] || exit 1
last=
if [ -r "$state" ]; then read -r last < "$state" || true; fi
echo "$start $switches" > "$state" || exit 1
[ "$last" != "$start $switches" ]
"""


# --------------------------------------------------------------------------- helpers


def k8s_version() -> str:
    version = kv_utils.latest_version()
    major, minor = (int(x) for x in version.split(".")[:2])
    assert (major, minor) >= (1, 30), f"kubernetes-validate ships only {version}"
    return version


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "m": Decimal("0.001")}


def quantity(value) -> Decimal:
    """A Kubernetes quantity ('250m', '1', '512Mi', '4Gi') as a Decimal (cores or bytes)."""
    text = str(value)
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, f"bad quantity {text!r}"
    number, suffix = Decimal(match.group(1)), match.group(2)
    return number * Decimal(_SUFFIX[suffix]) if suffix else number


def load_kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def build_base() -> list[dict]:
    """The documents a ``kustomize build`` of the base would emit (before transformers)."""
    docs: list[dict] = []
    for resource in load_kustomization(BASE)["resources"]:
        path = (BASE / resource).resolve()
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return build_base()


def find(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''}"
    return found if name is None else found[0]


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "Job", "CronJob")]


def pod_labels(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return doc["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels + matchExpressions) matches ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def policies_selecting(docs, labels: dict) -> dict[str, dict]:
    """The NetworkPolicies (name -> spec) whose podSelector selects a pod with ``labels``."""
    return {
        d["metadata"]["name"]: d["spec"] for d in find(docs, "NetworkPolicy") if selects(d["spec"]["podSelector"], labels)
    }


# --------------------------------------------------------------------------- kustomize


def test_base_kustomization_has_no_paths_outside_its_folder():
    kustomization = load_kustomization(BASE)
    resources = kustomization["resources"]
    assert resources
    for resource in resources:
        assert ".." not in Path(resource).parts and not os.path.isabs(resource), resource
        path = (BASE / resource).resolve()
        assert path.is_file() and BASE.resolve() in path.parents, resource
    assert "secret.example.yaml" not in resources
    assert (BASE / "secret.example.yaml").is_file()
    # no other value of the base's kustomization reaches outside either

    def strings(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    assert not [s for s in strings(kustomization) if ".." in s]


def test_every_yaml_in_the_base_is_listed_or_is_the_secret_example():
    listed = set(load_kustomization(BASE)["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - listed == {"secret.example.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_builds_the_base():
    """The overlays are rendered and checked in tests/deploy/test_overlays.py."""
    result = subprocess.run(["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(build_base())
    for doc in built:
        kubernetes_validate.validate(doc, k8s_version(), strict=True)


# --------------------------------------------------------------------------- schema


def _all_manifest_docs():
    for path in sorted(BASE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                yield pytest.param(doc, id=f"{path.name}#{index}:{doc['kind']}/{doc['metadata']['name']}")


@pytest.mark.parametrize("doc", list(_all_manifest_docs()))
def test_manifest_is_valid_kubernetes(doc):
    kubernetes_validate.validate(doc, k8s_version(), strict=True)


# --------------------------------------------------------------------------- guard rails


def test_namespace_guardrails(docs):
    quota = find(docs, "ResourceQuota")[0]["spec"]["hard"]
    assert {k: quantity(v) for k, v in quota.items()} == {k: quantity(v) for k, v in QUOTA.items()}
    (limit,) = find(docs, "LimitRange")[0]["spec"]["limits"]
    assert limit["type"] == "Container"
    for section, values in LIMIT_RANGE.items():
        assert {k: quantity(v) for k, v in limit[section].items()} == {k: quantity(v) for k, v in values.items()}


def test_seven_network_policies(docs):
    """The seven of the seed, plus the backups' bucket egress (test_backup_network_access)."""
    policies = {d["metadata"]["name"]: d["spec"] for d in find(docs, "NetworkPolicy")}
    assert len(policies) == 8
    assert set(policies) - set(BACKUP_POLICIES) == {
        "default-deny-all-ingress",
        "default-deny-all-egress",
        "block-production",
        "allow-dns",
        "allow-internet",
        "allow-backend-to-deps",
        "allow-ingress-to-backend",
    }
    assert policies["default-deny-all-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    assert policies["default-deny-all-egress"] == {"podSelector": {}, "policyTypes": ["Egress"]}

    def ports(rules):
        return {(p["protocol"], p["port"]) for rule in rules for p in rule.get("ports", [])}

    assert ports(policies["allow-dns"]["egress"]) == {("UDP", 53), ("TCP", 53)}
    assert ports(policies["allow-internet"]["egress"]) == {("TCP", 443)}
    datastores = policies["allow-backend-to-deps"]
    assert ports(datastores["egress"]) == ports(datastores["ingress"]) == {("TCP", 5432), ("TCP", 6379), ("TCP", 5672)}
    web = policies["allow-ingress-to-backend"]
    assert ports(web["ingress"]) == {("TCP", 8000)}
    assert web["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "traefik"}
    # production excluded by name and by label from every namespace-wide peer
    block = policies["block-production"]
    for rule in block["ingress"] + block["egress"]:
        for peer in rule.get("from", []) + rule.get("to", []):
            expressions = peer["namespaceSelector"]["matchExpressions"]
            assert all(e["operator"] == "NotIn" for e in expressions)
            assert any("robson" in e["values"] for e in expressions)  # the seed's production namespace
    # no other policy admits arbitrary namespaces
    for name, spec in policies.items():
        if name == "block-production":
            continue
        for rule in spec.get("ingress", []) + spec.get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                assert peer.get("namespaceSelector") != {}, name


def test_outbox_relay_network_access(docs):
    """The relay's egress, summed over every policy that selects its pods, is DNS, PostgreSQL, Redis
    (doctor --quick checks it at start) and RabbitMQ in its own namespace: no HTTPS, no other
    stopmonitor pod, no other namespace; the only ingress rule reaching it is the datastores' one."""
    relay_labels = pod_labels(find(docs, "Deployment", RELAY))
    selecting = policies_selecting(docs, relay_labels)
    assert set(selecting) == {"default-deny-all-ingress", "default-deny-all-egress", "allow-dns", "allow-backend-to-deps"}

    def rules(direction):
        key = {"Ingress": "ingress", "Egress": "egress"}[direction]
        return [
            (name, rule)
            for name, spec in selecting.items()
            if direction in spec["policyTypes"]
            for rule in spec.get(key, [])
        ]

    egress = {
        (name, yaml.safe_dump(rule["to"], sort_keys=True), frozenset((p["protocol"], p["port"]) for p in rule["ports"]))
        for name, rule in rules("Egress")
    }
    dns_peer = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                 "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    datastore_peer = [{"podSelector": {}}]  # the namespace's pods (behind postgres-staging, ...)
    assert egress == {
        ("allow-dns", yaml.safe_dump(dns_peer, sort_keys=True), frozenset({("UDP", 53), ("TCP", 53)})),
        (
            "allow-backend-to-deps",
            yaml.safe_dump(datastore_peer, sort_keys=True),
            frozenset({("TCP", 5432), ("TCP", 6379), ("TCP", 5672)}),
        ),
    }
    # ingress: only allow-backend-to-deps' two rules (written for the datastore pods, it selects every
    # pod); the relay listens on no port, so nothing reaches it
    ingress = rules("Ingress")
    assert [name for name, _ in ingress] == ["allow-backend-to-deps", "allow-backend-to-deps"]
    assert [rule["from"] for _, rule in ingress] == [[{"podSelector": {"matchLabels": {"stopmonitor.io/tier": "backend"}}}],
                                                     [{"podSelector": {"matchLabels": {"stopmonitor.io/tier": "backup"}}}]]
    container = pod_spec(find(docs, "Deployment", RELAY))["containers"][0]
    assert "ports" not in container
    # the other pods keep HTTPS (Binance) and the production guard
    for doc in workloads(docs):
        if doc["metadata"]["name"] in (RELAY, *BACKUP_CRONJOBS):
            continue
        others = policies_selecting(docs, pod_labels(doc))
        assert {"allow-internet", "block-production", "allow-dns", "allow-backend-to-deps"} <= set(
            others
        ), doc["metadata"]["name"]


def test_every_container_fits_the_limit_range(docs):
    maximum = {k: quantity(v) for k, v in LIMIT_RANGE["max"].items()}
    for doc in workloads(docs):
        for container in pod_spec(doc)["containers"]:
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                request = quantity(resources["requests"][kind])
                limit = quantity(resources["limits"][kind])
                assert request <= limit <= maximum[kind], (doc["metadata"]["name"], kind)


def _pod_totals(doc) -> dict[str, Decimal]:
    totals = {k: Decimal(0) for k in QUOTA}
    for container in pod_spec(doc)["containers"] + pod_spec(doc).get("initContainers", []):
        for section in ("requests", "limits"):
            for kind in ("cpu", "memory"):
                totals[f"{section}.{kind}"] += quantity(container["resources"][section][kind])
    return totals


def backup_windows(docs) -> dict[str, tuple[int, int]]:
    """Each daily/monthly backup CronJob's window in seconds after 00:00 UTC of its day: from its
    scheduled minute to the latest moment its Job can still run (start deadline + active deadline)."""
    windows = {}
    for name in BACKUP_CRONJOBS:
        cron = find(docs, "CronJob", name)["spec"]
        assert cron["concurrencyPolicy"] == "Forbid" and cron["timeZone"] == "Etc/UTC"
        minute, hour, *_ = cron["schedule"].split()
        start = int(hour) * 3600 + int(minute) * 60
        windows[name] = (start, start + cron["startingDeadlineSeconds"] + cron["jobTemplate"]["spec"]["activeDeadlineSeconds"])
    return windows


def worst_case(docs) -> dict[str, Decimal]:
    """Our pods at one instant, at worst: web replicas + the rolling-update surge pod, one monitor
    CronJob pod (concurrencyPolicy Forbid), the migrate, backfill and setup-roles Jobs, the outbox
    relay replicas + their surge pod, the stream monitor (one replica, Recreate: never two), and one
    backup pod (their windows never overlap: test_backup_windows_never_overlap), the largest."""
    total = {k: Decimal(0) for k in QUOTA}
    for doc in workloads(docs):
        if doc["metadata"]["name"] in BACKUP_CRONJOBS:
            continue
        count = 1
        if doc["kind"] == "Deployment":
            strategy = doc["spec"]["strategy"]
            surge = int(strategy["rollingUpdate"]["maxSurge"]) if strategy["type"] == "RollingUpdate" else 0
            count = doc["spec"]["replicas"] + surge
        for key, value in _pod_totals(doc).items():
            total[key] += value * count
    backups = [_pod_totals(find(docs, "CronJob", n)) for n in BACKUP_CRONJOBS]
    for key in QUOTA:
        total[key] += max(b[key] for b in backups)
    return total


def test_backup_windows_never_overlap(docs):
    """02:15 base backup, 03:45 pg_dump, 05:00 drill (on the 1st): even started at their start
    deadline and run to their active deadline, no two run at once, and the last ends before the
    next day's first starts; so the quota counts one backup pod."""
    windows = sorted(backup_windows(docs).values())
    assert windows == [(8100, 8100 + 300 + 4800), (13500, 13500 + 300 + 3600), (18000, 18000 + 3600 + 14400)]
    for (_, end), (start, _) in zip(windows, windows[1:]):
        assert end < start
    assert windows[-1][1] < windows[0][0] + 86400


def test_quota_arithmetic(docs):
    """Worst case at one instant (worst_case) against the namespace's quota, and the tables of
    deploy/README.md."""
    web = find(docs, "Deployment", "stopmonitor-web")
    assert web["spec"]["replicas"] == 2
    assert web["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1
    cron = find(docs, "CronJob", "stopmonitor-monitor-stops")
    relay = find(docs, "Deployment", RELAY)
    assert relay["spec"]["replicas"] == 2
    relay_pods = relay["spec"]["replicas"] + int(relay["spec"]["strategy"]["rollingUpdate"]["maxSurge"])
    assert relay_pods == 3
    stream = find(docs, "Deployment", STREAM)
    assert stream["spec"]["replicas"] == 1 and stream["spec"]["strategy"] == {"type": "Recreate"}
    # every Deployment, Job and CronJob of the base is counted by worst_case
    assert {d["metadata"]["name"] for d in workloads(docs)} == {
        "stopmonitor-web", "stopmonitor-monitor-stops", "stopmonitor-migrate", "stopmonitor-backfill", RELAY, STREAM,
        SETUP_ROLES, *BACKUP_CRONJOBS,
    }
    total = worst_case(docs)
    hard = {k: quantity(v) for k, v in QUOTA.items()}
    for key in QUOTA:
        assert total[key] <= hard[key], f"{key}: {total[key]} > {hard[key]}"
    # the numbers written in deploy/README.md
    assert total == {
        "requests.cpu": Decimal("1.700"),
        "requests.memory": 3456 * 2**20,
        "limits.cpu": Decimal("6.250"),
        "limits.memory": 7424 * 2**20,
    }
    stream_pod = _pod_totals(stream)
    assert stream_pod == {
        "requests.cpu": Decimal("0.250"),
        "requests.memory": 256 * 2**20,
        "limits.cpu": Decimal("0.500"),
        "limits.memory": 512 * 2**20,
    }
    relay_pod = _pod_totals(relay)
    assert relay_pod == {
        "requests.cpu": Decimal("0.050"),
        "requests.memory": 128 * 2**20,
        "limits.cpu": Decimal("0.250"),
        "limits.memory": 256 * 2**20,
    }
    # the steady state (2 web + the CronJob pod + 2 relays + the stream) as well
    steady = {k: _pod_totals(web)[k] * 2 + _pod_totals(cron)[k] + relay_pod[k] * 2 + stream_pod[k] for k in QUOTA}
    assert steady == {
        "requests.cpu": Decimal("0.900"),
        "requests.memory": 1664 * 2**20,
        "limits.cpu": Decimal("3.250"),
        "limits.memory": 3328 * 2**20,
    }
    # the table in deploy/README.md, row by row
    readme = (ROOT / "deploy" / "README.md").read_text()

    def row(label, values, bold=False):
        cpu = lambda v: f"{int(v * 1000)}m"  # noqa: E731
        mem = lambda v: f"{int(v / 2**20)}Mi"  # noqa: E731
        cells = [cpu(values["requests.cpu"]), mem(values["requests.memory"]),
                 cpu(values["limits.cpu"]), mem(values["limits.memory"])]
        cells = [f"**{c}**" for c in cells] if bold else cells
        return "| " + " | ".join([label, *cells]) + " |"

    for label, name, count in (("web × 3", "stopmonitor-web", 3), ("CronJob × 1", "stopmonitor-monitor-stops", 1),
                               ("migrate × 1", "stopmonitor-migrate", 1), ("backfill × 1", "stopmonitor-backfill", 1),
                               ("setup-roles × 1", SETUP_ROLES, 1)):
        doc = [d for d in workloads(docs) if d["metadata"]["name"] == name][0]
        assert row(label, {k: v * count for k, v in _pod_totals(doc).items()}) in readme, label
    assert row("relay × 3", {k: v * relay_pods for k, v in relay_pod.items()}) in readme
    assert row("stream × 1", stream_pod) in readme
    backups = [_pod_totals(find(docs, "CronJob", n)) for n in BACKUP_CRONJOBS]
    assert row("largest backup pod × 1", {k: max(b[k] for b in backups) for k in QUOTA}) in readme
    assert row("**total**", total, bold=True) in readme
    assert row("headroom", {k: hard[k] - total[k] for k in QUOTA}) in readme
    assert "requests 900m / 1664Mi, limits 3250m / 3328Mi" in readme


# --------------------------------------------------------------------------- workloads


def test_web_deployment_probes_and_ports(docs):
    web = find(docs, "Deployment", "stopmonitor-web")
    (container,) = pod_spec(web)["containers"]
    assert container["args"] == ["web"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # graceful shutdown fits in the grace period: preStop sleep + gunicorn graceful_timeout
    config_map = find(docs, "ConfigMap", "stopmonitor-config")["data"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pre_stop + int(config_map["GUNICORN_GRACEFUL_TIMEOUT"]) < pod_spec(web)["terminationGracePeriodSeconds"]


@pytest.mark.parametrize(
    "kind,name",
    [
        ("Deployment", "stopmonitor-web"),
        ("CronJob", "stopmonitor-monitor-stops"),
        ("Job", "stopmonitor-migrate"),
        ("Job", "stopmonitor-backfill"),
        ("Deployment", RELAY),
        ("Deployment", STREAM),
    ],
)
def test_pod_security_env_and_tmp(docs, kind, name):
    doc = find(docs, kind, name)
    spec = pod_spec(doc)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["automountServiceAccountToken"] is False
    tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for container in spec["containers"]:
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/tmp") in tmp_volumes
        # both spellings: canonical and RBS_* secrets, optional, plus the operator's database secret
        secrets = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
        assert {s["name"] for s in secrets} == {"stopmonitor-secrets", "stopmonitor-rbs-secrets"}
        assert all(s["optional"] is True for s in secrets)
        assert {"configMapRef": {"name": "stopmonitor-config"}} in container["envFrom"]
        mapped = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        if name == "stopmonitor-migrate":  # issue 17: migrations run as the owner role, from its own Secret
            assert mapped.pop("DATABASE_URL") == {"name": "postgres-staging-owner", "key": "DATABASE_URL"}
            plain = {e["name"]: e["value"] for e in container["env"] if "value" in e}
            assert plain == {"DATABASE_OWNER_ROLE": "stopmonitor_owner", "DATABASE_RUNTIME_ROLE": "stopmonitor_runtime"}
        assert set(mapped) == {"RBS_PG_HOST", "RBS_PG_PORT", "RBS_PG_DATABASE", "RBS_PG_USER", "RBS_PG_PASSWORD"}
        assert all(ref["optional"] is True for ref in mapped.values())
        assert container["image"] == "stopmonitor:latest"


def test_monitor_cronjob(docs):
    cron = find(docs, "CronJob", "stopmonitor-monitor-stops")
    spec = cron["spec"]
    assert spec["schedule"] == "*/1 * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 0 < spec["startingDeadlineSeconds"] <= 60
    assert spec["successfulJobsHistoryLimit"] <= 3
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    assert 0 < job["activeDeadlineSeconds"] < 60  # a pass ends before the next minute's
    pod = pod_spec(cron)
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["args"] == ["monitor"]
    requests = container["resources"]["requests"]
    assert quantity(requests["cpu"]) <= Decimal("0.05") and quantity(requests["memory"]) <= 128 * 2**20


def test_jobs(docs):
    migrate = find(docs, "Job", "stopmonitor-migrate")
    assert pod_spec(migrate)["containers"][0]["args"] == ["migrate"]
    assert pod_spec(migrate)["restartPolicy"] == "Never"
    backfill = find(docs, "Job", "stopmonitor-backfill")
    assert pod_spec(backfill)["containers"][0]["args"] == ["backfill"]
    assert backfill["spec"]["suspend"] is True  # started on purpose, never by an apply


def test_outbox_relay_deployment(docs):
    from stopmonitor.outbox import CONFIRM_TIMEOUT_SECONDS, CONNECT_TIMEOUT_SECONDS

    relay = find(docs, "Deployment", RELAY)
    spec = relay["spec"]
    assert spec["replicas"] == 2  # several relays are safe (stopmonitor/outbox.py); the second is for availability
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert spec["minReadySeconds"] == 10
    labels = pod_labels(relay)
    assert labels == {
        "app.kubernetes.io/name": "stopmonitor",
        "app.kubernetes.io/part-of": "stopmonitor",
        "app.kubernetes.io/component": "outbox",
        "stopmonitor.io/tier": "backend",
    }
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/name": "stopmonitor", "app.kubernetes.io/component": "outbox"}
    # the selectors of the two Deployments and the web Service do not overlap
    web = find(docs, "Deployment", "stopmonitor-web")
    assert not selects(web["spec"]["selector"], labels)
    assert not selects(spec["selector"], pod_labels(web))
    assert not selects({"matchLabels": find(docs, "Service", "stopmonitor-web")["spec"]["selector"]}, labels)
    pod = pod_spec(relay)
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway" and spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"] == spec["selector"]
    (container,) = pod["containers"]
    assert container["image"] == "stopmonitor:latest"
    assert container["args"] == ["outbox", "--loop"]  # entrypoint: manage.py publish_outbox --loop
    assert "command" not in container  # the image's entrypoint (doctor --quick first) runs it
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"cpu": "250m", "memory": "256Mi"},
    }
    # no HTTP: one exec liveness probe, no readiness/startup probe, no port
    assert {"readinessProbe", "startupProbe", "ports", "lifecycle"}.isdisjoint(container)
    probe = container["livenessProbe"]
    assert probe == {
        "exec": {"command": ["sh", "-c", RELAY_LIVENESS_SCRIPT]},
        "initialDelaySeconds": 10,
        "periodSeconds": 30,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    # the probe keeps its state in the writable /tmp
    assert RELAY_LIVENESS_SCRIPT.startswith("state=/tmp/")
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    # a restart needs (failureThreshold) probes without progress: far longer than the longest
    # legitimate wait inside the loop (broker connect + one publisher confirm)
    longest_wait = CONNECT_TIMEOUT_SECONDS + CONFIRM_TIMEOUT_SECONDS
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 6 * longest_wait
    assert probe["periodSeconds"] > longest_wait
    # SIGTERM ends the loop after the batch in flight, whose waits are bounded by those timeouts
    assert pod["terminationGracePeriodSeconds"] == 20
    assert pod["terminationGracePeriodSeconds"] >= longest_wait + 5
    # RABBITMQ_URL comes from the secrets (either spelling), never from the ConfigMap
    assert not {"RABBITMQ_URL", "RBS_RABBITMQ_URL"} & set(find(docs, "ConfigMap", "stopmonitor-config")["data"])
    assert "manage.py publish_outbox" in (DOCKER / "entrypoint.sh").read_text()


def test_monitor_stream_deployment(docs):
    """One replica, Recreate, an exec liveness probe on progress (the file the stream writes), metrics
    on 9100, HTTPS egress (Binance WebSockets on 443) like the CronJob, selectors apart from the others."""
    from stopmonitor.stream.command import VENUE_URLS

    stream = find(docs, "Deployment", STREAM)
    spec = stream["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    labels = pod_labels(stream)
    assert labels["app.kubernetes.io/component"] == "monitor-stream" and labels["stopmonitor.io/tier"] == "backend"
    for other in ("stopmonitor-web", RELAY):
        doc = find(docs, "Deployment", other)
        assert not selects(doc["spec"]["selector"], labels) and not selects(spec["selector"], pod_labels(doc))
    pod = pod_spec(stream)
    (container,) = pod["containers"]
    assert container["args"] == ["monitor", "--stream", "--metrics-port", "9100"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
    probe = container["livenessProbe"]
    assert probe["exec"]["command"] == ["python", "-m", "stopmonitor.stream.probe", "/tmp/stopmonitor-stream-progress", "60"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 60
    # the file the probe reads is the one the process writes by default, under the writable /tmp
    from django.conf import settings

    assert settings.STREAM["PROGRESS_FILE"] == "/tmp/stopmonitor-stream-progress"
    assert "allow-internet" in policies_selecting(docs, labels)
    assert all(url.split("/")[2].endswith(":443") or ":" not in url.split("/")[2]
               for pair in VENUE_URLS.values() for url in pair)


def test_service_and_ingress(docs):
    web = find(docs, "Deployment", "stopmonitor-web")
    service = find(docs, "Service", "stopmonitor-web")
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    ingress = find(docs, "Ingress")
    assert len(ingress) == 1
    ingress = ingress[0]
    assert ingress["spec"]["ingressClassName"] == "traefik"
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert hosts == API_HOSTS
    assert {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]} == API_HOSTS
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            assert path["backend"]["service"] == {"name": "stopmonitor-web", "port": {"name": "http"}}


def test_config_map(docs):
    data = find(docs, "ConfigMap", "stopmonitor-config")["data"]
    assert data["ENVIRONMENT"] == "staging"
    assert set(data["ALLOWED_HOSTS"].split(",")) == API_HOSTS
    assert data["CACHE_DIR"].startswith("/tmp/")
    for secret_name in ("SECRET_KEY", "DATABASE_URL", "BINANCE_API_KEY", "BINANCE_API_SECRET", "RBS_PG_PASSWORD"):
        assert secret_name not in data
    # database connection bound per pod (see docker/README.md)
    workers, per_worker = int(data["GUNICORN_WORKERS"]), int(data["GUNICORN_DB_POOL_SIZE"])
    assert workers * per_worker <= int(data["GUNICORN_DB_CONNECTION_BUDGET"])
    # HTTP connections are not capped at the pool: idle keep-alive clients must not starve others (issue 16)
    assert int(data["GUNICORN_WORKER_CONNECTIONS"]) >= 10 * per_worker


# --------------------------------------------------------------------------- Docker


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_lints():
    instructions = _dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert all(f.split()[0] == "python:3.12-slim-bookworm" for f in froms)
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]) and not users[-1].startswith("0")
    healthchecks = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/health" in healthchecks[0] and "curl" not in healthchecks[0]
    assert ("ENTRYPOINT", '["/app/docker/entrypoint.sh"]') in instructions
    assert ("CMD", '["web"]') in instructions
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    installs = [c.strip() for run in runs for c in re.split(r"&&|;|\|\|", run) if "pip install" in c]
    assert installs, "dependencies come from requirements.txt"
    for command in installs:
        args = command.split("pip install", 1)[1].split()
        assert "-r" in args, f"pip install of something other than requirements: {command}"
        extra = [a for a in args if not a.startswith("-") and "requirements" not in a]
        assert not extra, f"pip install of {extra}"
    runs = " ".join(runs)
    assert "collectstatic" in runs and "ENVIRONMENT=development" in runs
    envs = " ".join(rest for kw, rest in instructions if kw == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in envs and "CACHE_DIR=/tmp/" in envs
    assert any(kw == "COPY" and "requirements.txt" in rest for kw, rest in instructions)
    assert any(kw == "COPY" and rest.startswith("--from=builder") for kw, rest in instructions)


def test_dockerignore_keeps_what_the_build_needs():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("requirements.txt", "manage.py", "docker", "config", "api", "stopmonitor", "docker/entrypoint.sh"):
        assert needed not in patterns
    for excluded in (".git", ".venv", "staticfiles", "db.sqlite3"):
        assert excluded in patterns


def test_entrypoint_script():
    path = DOCKER / "entrypoint.sh"
    assert os.access(path, os.X_OK)
    subprocess.run(["sh", "-n", str(path)], check=True, timeout=10)
    text = path.read_text()
    assert "manage.py doctor --quick" in text
    for target in (
        "gunicorn -c docker/gunicorn.conf.py config.wsgi:application",
        "manage.py monitor_stops",
        "manage.py migrate",
        "celery -A config.celery:app worker",
        "celery -A config.celery:app beat",
        "manage.py backfill_stop_price",
        "manage.py publish_outbox",
    ):
        assert target in text, target


def test_gunicorn_config_values(monkeypatch):
    for name in list(os.environ):
        if name.startswith("GUNICORN_") or name == "PORT":
            monkeypatch.delenv(name)
    for name in ("DB_POOL_MAX_SIZE", "DB_POOL_TIMEOUT", "DB_LOCK_TIMEOUT_MS", "API_REQUEST_DEADLINE_SECONDS"):
        monkeypatch.setenv(name, "")  # the config exports them: undone after the test
    conf = runpy.run_path(str(DOCKER / "gunicorn.conf.py"))
    assert conf["worker_class"] == "gevent"
    assert conf["preload_app"] is False
    assert conf["worker_tmp_dir"] == "/dev/shm"
    assert conf["bind"] == ["0.0.0.0:8000"]
    assert (conf["workers"], conf["worker_connections"], conf["db_pool_size"]) == (2, 1000, 10)
    assert (os.environ["DB_POOL_MAX_SIZE"], os.environ["DB_POOL_TIMEOUT"], os.environ["DB_LOCK_TIMEOUT_MS"],
            os.environ["API_REQUEST_DEADLINE_SECONDS"]) == ("10", "2", "3000", "5")
    assert conf["accesslog"] == "-" and conf["errorlog"] == "-"
    # the budget caps workers x the database pool, not the HTTP connections
    monkeypatch.setenv("GUNICORN_WORKERS", "4")
    monkeypatch.setenv("GUNICORN_DB_POOL_SIZE", "50")
    monkeypatch.setenv("GUNICORN_DB_CONNECTION_BUDGET", "40")
    monkeypatch.setenv("PORT", "9000")
    conf = runpy.run_path(str(DOCKER / "gunicorn.conf.py"))
    assert (conf["workers"], conf["worker_connections"], conf["db_pool_size"]) == (4, 1000, 10)
    assert conf["bind"] == ["0.0.0.0:9000"]
    # nothing from Django or psycopg in the config (it runs in the arbiter, before gevent patches);
    # config.env (plain Python: the configuration check that stops the master with 78) is allowed
    text = (DOCKER / "gunicorn.conf.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(django|psycopg|api|stopmonitor|config(?!\.env\b))\b", text, re.M)


# --------------------------------------------------------------------------- compose


def test_compose_services():
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    services = compose["services"]
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    assert services["rabbitmq"]["image"] == "rabbitmq:3-management"
    for infra in ("postgres", "redis", "rabbitmq"):
        assert services[infra]["healthcheck"]["test"]
    app = {"migrate", "web", "monitor", "worker", "beat", "outbox"}
    assert app <= set(services)
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["web"]["command"] == ["web"]
    assert services["monitor"]["command"] == ["monitor", "--loop", "--interval", "60"]
    assert services["worker"]["command"] == ["worker"]
    assert services["beat"]["command"] == ["beat"]
    assert services["outbox"]["command"] == ["outbox", "--loop"]
    assert "disable" not in services["web"]["healthcheck"]
    for name in app:
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
        assert service["user"] == "10001:10001"
        env = service["environment"]
        for key in ("ENVIRONMENT", "SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "REDIS_URL", "RABBITMQ_URL"):
            assert env[key], key
        depends = service["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy"
        if name != "migrate":
            assert depends["migrate"]["condition"] == "service_completed_successfully"


# --------------------------------------------------------------------------- backups (issue 17)


def test_only_migrate_setup_roles_and_backups_read_the_owner_secret(docs):
    """The owner role's Secret reaches the migrate Job, the setup-roles Job, pg_dump and the drill;
    web, monitor, relay and backfill never see it (they connect as the runtime role)."""
    readers = set()
    for doc in workloads(docs):
        text = yaml.safe_dump(pod_spec(doc))
        if "postgres-staging-owner" in text:
            readers.add(doc["metadata"]["name"])
    assert readers == {"stopmonitor-migrate", SETUP_ROLES, "stopmonitor-pgdump", "stopmonitor-restore-drill"}


@pytest.mark.parametrize("name", BACKUP_CRONJOBS)
def test_backup_cronjobs_are_non_root_read_only_and_b2_ready(docs, name):
    cron = find(docs, "CronJob", name)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["timeZone"] == "Etc/UTC"
    spec = pod_spec(cron)
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 999
    (container,) = spec["containers"]
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and ctx["runAsUser"] == 999
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in [v for v in spec["volumes"] if v["name"] == mounts["/tmp"]["name"]][0]
    assert all(m.get("readOnly") for path, m in mounts.items() if path != "/tmp")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"
    assert {"secretRef": {"name": "stopmonitor-backup"}} in container["envFrom"]  # credentials from a Secret
    assert not [e for e in container["env"] if "value" in e and "KEY" in e["name"]]
    assert pod_labels(cron)["stopmonitor.io/tier"] == "backup"
    version = (DOCKER / "postgres" / "VERSION").read_text().strip()  # the tag CI builds (.github/workflows/ci.yml)
    assert container["image"] in (f"stopmonitor-postgres:v{version}", f"stopmonitor-drill:v{version}")


def test_backup_schedules_retention_and_archiving_settings(docs):
    assert find(docs, "CronJob", "stopmonitor-basebackup")["spec"]["schedule"] == "15 2 * * *"
    assert find(docs, "CronJob", "stopmonitor-pgdump")["spec"]["schedule"] == "45 3 * * *"
    assert find(docs, "CronJob", "stopmonitor-restore-drill")["spec"]["schedule"] == "0 5 1 * *"  # monthly
    base = pod_spec(find(docs, "CronJob", "stopmonitor-basebackup"))["containers"][0]
    script = base["args"][0]
    assert "barman-cloud-backup " in script and "barman-cloud-backup-delete" in script
    assert {e["name"]: e.get("value") for e in base["env"]}["BACKUP_RETENTION_POLICY"] == "RECOVERY WINDOW OF 14 DAYS"
    dump = pod_spec(find(docs, "CronJob", "stopmonitor-pgdump"))["containers"][0]
    assert dump["command"] == ["pg-dump-offsite"] and (DOCKER / "postgres" / "pg-dump-offsite.sh").is_file()
    conf = find(docs, "ConfigMap", "stopmonitor-postgres-archiving")["data"]["archiving.conf"]
    settings = dict(line.split(" = ", 1) for line in conf.strip().splitlines())
    assert settings["wal_level"] == "replica" and settings["archive_mode"] == "on"
    assert int(settings["archive_timeout"]) <= 60  # the recovery point objective
    assert settings["archive_command"].startswith("'barman-cloud-wal-archive ") and "%p" in settings["archive_command"]


def test_backup_network_access(docs):
    """Backup pods: the bucket (public addresses, 443), PostgreSQL and DNS; not the HTTPS-to-Binance
    policy, not the production guard's namespace-wide peers. The datastores admit them on 5432 only,
    through the seed's allow-backend-to-deps (the seed's datastores carry none of our labels)."""
    for name in BACKUP_CRONJOBS:
        selecting = policies_selecting(docs, pod_labels(find(docs, "CronJob", name)))
        assert set(selecting) == {"default-deny-all-ingress", "default-deny-all-egress", "allow-dns",
                                  "allow-backend-to-deps", "allow-backup-to-bucket"}, name
    bucket = find(docs, "NetworkPolicy", "allow-backup-to-bucket")["spec"]
    (rule,) = bucket["egress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 443}]
    assert "169.254.0.0/16" in rule["to"][0]["ipBlock"]["except"]  # never the cloud metadata service
    deps = find(docs, "NetworkPolicy", "allow-backend-to-deps")["spec"]
    assert deps["podSelector"] == {}
    assert deps["ingress"][1] == {"from": [{"podSelector": {"matchLabels": {"stopmonitor.io/tier": "backup"}}}],
                                  "ports": [{"protocol": "TCP", "port": 5432}]}