"""deploy/scripts/check_deploy.py: each check passes on the repository and fails on a broken copy.

Needs the tools of requirements-ci.txt (``make check-deploy`` installs them into .venv); the
module is skipped without regopy or kubectl.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("regopy")
if not ((Path(sys.executable).parent / "kubectl").is_file() or shutil.which("kubectl")):
    pytest.skip("no kubectl (requirements-ci.txt ships one)", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("check_deploy", ROOT / "deploy" / "scripts" / "check_deploy.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

SHA = "sha-" + "0123456789abcdef" * 2 + "01234567"


@pytest.fixture(scope="module")
def argo() -> list[dict]:
    return check.argocd_documents()


@pytest.fixture(scope="module")
def rendered(argo) -> dict[str, list[dict]]:
    return {a["metadata"]["name"]: check.render_application(a) for a in argo if a["kind"] == "Application"}


def app(docs, name):
    (found,) = [d for d in docs if d["kind"] == "Application" and d["metadata"]["name"] == name]
    return found


def doc(docs, kind, name):
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def container(workload):
    spec = workload["spec"]["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else workload["spec"]
    return spec["template"]["spec"]["containers"][0]


# --------------------------------------------------------------------------- rendering


def test_every_overlay_renders_valid_and_argo_cd_leaves_the_backfill_out(rendered):
    for overlay in ("staging", "production"):
        docs = check.kustomize(ROOT / "deploy" / "k8s" / "overlays" / overlay)
        assert check.validate_kubernetes(docs, overlay) == []
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert ("Job", "stopmonitor-backfill") in names  # kubectl apply -k by hand still has it
        argo_names = {(d["kind"], d["metadata"]["name"]) for d in rendered[f"stopmonitor-{overlay}"]}
        assert names - argo_names == {("Job", "stopmonitor-backfill")}
        assert argo_names <= names


def test_strict_kubernetes_validation_rejects_an_unknown_field(rendered):
    docs = copy.deepcopy(rendered["stopmonitor-staging"])
    web = doc(docs, "Deployment", "backend-staging")
    web["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True  # wrong case
    errors = check.validate_kubernetes([web], "staging")
    assert len(errors) == 1 and "readOnlyRootFileSystem" in errors[0]


def test_images_are_the_registrys_immutable_tags(rendered):
    for name, pattern in (("stopmonitor-staging", r"sha-[0-9a-f]{40}"), ("stopmonitor-production", r"v\d+\.\d+\.\d+")):
        images = {
            c["image"]
            for d in rendered[name]
            if d["kind"] in ("Deployment", "Job", "CronJob") and d["metadata"]["labels"]["app.kubernetes.io/component"] != "backup"
            for c in [container(d)]
        }
        (image,) = images
        repository, tag = image.rsplit(":", 1)
        assert repository == "ghcr.io/ldamasio/rbs-backend-monolith"
        assert re.fullmatch(pattern, tag), image
        # the backup images: GHCR, the tag of docker/postgres/VERSION (CI builds it once)
        version = (ROOT / "docker" / "postgres" / "VERSION").read_text().strip()
        backups = {container(d)["image"] for d in rendered[name]
                   if d["kind"] == "CronJob" and d["metadata"]["labels"]["app.kubernetes.io/component"] == "backup"}
        assert backups == {f"ghcr.io/ldamasio/stopmonitor-postgres:v{version}", f"ghcr.io/ldamasio/stopmonitor-drill:v{version}"}


# --------------------------------------------------------------------------- policy


def test_policy_passes_on_both_environments(rendered):
    assert check.policy("staging", rendered["stopmonitor-staging"]) == []
    assert check.policy("production", rendered["stopmonitor-production"]) == []


def _broken(rendered, env, kind, name, mutate):
    docs = copy.deepcopy(rendered[f"stopmonitor-{env}"])
    mutate(doc(docs, kind, name))
    return check.policy(env, docs)


@pytest.mark.parametrize(
    "kind,name,mutate,message",
    [
        (
            "Deployment", "backend-staging",
            lambda d: (container(d)["securityContext"].pop("runAsNonRoot"),
                       d["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")),
            "staging Deployment/backend-staging container web: runAsNonRoot is not true",
        ),
        (
            "CronJob", "stopmonitor-monitor-stops",
            lambda d: container(d)["securityContext"].update(runAsUser=0),
            "staging CronJob/stopmonitor-monitor-stops container monitor-stops: runs as uid 0",
        ),
        (
            "Job", "stopmonitor-migrate",
            lambda d: container(d)["securityContext"].update(readOnlyRootFilesystem=False),
            "staging Job/stopmonitor-migrate container migrate: readOnlyRootFilesystem is not true",
        ),
        (
            "Deployment", "stopmonitor-outbox-relay",
            lambda d: container(d)["resources"]["limits"].pop("memory"),
            "staging Deployment/stopmonitor-outbox-relay container outbox-relay: no limits.memory",
        ),
        (
            "Deployment", "stopmonitor-outbox-relay",
            lambda d: container(d).pop("livenessProbe"),
            "staging Deployment/stopmonitor-outbox-relay container outbox-relay: no livenessProbe",
        ),
        (
            "Deployment", "backend-staging",
            lambda d: container(d).pop("readinessProbe"),
            "staging Deployment/backend-staging container web: serves a port but has no readinessProbe",
        ),
        (
            "Deployment", "backend-staging",
            lambda d: container(d).update(image="ghcr.io/ldamasio/rbs-backend-monolith:staging-latest"),
            "staging Deployment/backend-staging container web: image ghcr.io/ldamasio/rbs-backend-monolith:staging-latest"
            " is a floating tag (use sha-<commit>, vX.Y.Z or a digest)",
        ),
        (
            "Deployment", "backend-staging",
            lambda d: container(d).update(image="ghcr.io/ldamasio/rbs-backend-monolith"),
            "staging Deployment/backend-staging container web: image ghcr.io/ldamasio/rbs-backend-monolith"
            " is a floating tag (use sha-<commit>, vX.Y.Z or a digest)",
        ),
    ],
)
def test_policy_names_each_violation(rendered, kind, name, mutate, message):
    assert _broken(rendered, "staging", kind, name, mutate) == [message]


def test_production_takes_version_tags_or_digests_only(rendered):
    def image(value):
        return lambda d: container(d).update(image=value)

    registry = "ghcr.io/ldamasio/rbs-backend-monolith"
    for value in (f"{registry}:{SHA}", f"{registry}:latest", f"{registry}:v1.2", "registry:5000/x"):
        assert _broken(rendered, "production", "Job", "stopmonitor-migrate", image(value)) == [
            f"production Job/stopmonitor-migrate container migrate: image {value} is not a version tag vX.Y.Z or a digest"
        ]
    assert _broken(rendered, "production", "Job", "stopmonitor-migrate", image(f"{registry}@sha256:{'a' * 64}")) == []
    assert _broken(rendered, "production", "Job", "stopmonitor-migrate", image(f"{registry}:v2.10.0")) == []
    # staging accepts the main build's sha- tag
    assert _broken(rendered, "staging", "Job", "stopmonitor-migrate", image(f"{registry}:{SHA}")) == []


def test_init_containers_are_checked_too(rendered):
    def add_init(d):
        d["spec"]["template"]["spec"]["initContainers"] = [{"name": "wait", "image": "busybox:1.36"}]

    messages = _broken(rendered, "staging", "Deployment", "backend-staging", add_init)
    prefix = "staging Deployment/backend-staging container wait: "
    assert messages == sorted(
        prefix + m
        for m in [
            "allowPrivilegeEscalation is not false",
            "image busybox:1.36 is a floating tag (use sha-<commit>, vX.Y.Z or a digest)",
            "no limits.cpu", "no limits.memory", "no requests.cpu", "no requests.memory",
            "readOnlyRootFilesystem is not true",
        ]
    )  # runAsNonRoot comes from the pod; an init container needs no probe


# --------------------------------------------------------------------------- Argo CD


def test_argo_cd_manifests_match_the_crd_schemas(argo):
    assert check.validate_argocd_schema(argo) == []
    broken = copy.deepcopy(argo)
    app(broken, "stopmonitor-staging")["spec"]["syncPolicy"]["automated"]["selfheal"] = True  # typo
    app(broken, "stopmonitor-production")["spec"]["destination"]["namespace"] = 7
    errors = check.validate_argocd_schema(broken)
    assert len(errors) == 2
    assert "spec/syncPolicy/automated: Additional properties are not allowed ('selfheal' was unexpected)" in errors[1]
    assert "spec/destination/namespace: 7 is not of type 'string'" in errors[0]


def test_argo_cd_rules_pass(argo, rendered):
    assert check.argocd_rules(argo, rendered) == []


def _rules(argo, rendered, mutate_argo=None, mutate_rendered=None):
    argo, rendered = copy.deepcopy(argo), copy.deepcopy(rendered)
    if mutate_argo:
        mutate_argo(argo)
    if mutate_rendered:
        mutate_rendered(rendered)
    return check.argocd_rules(argo, rendered)


def test_argo_cd_rules_fail(argo, rendered):
    def project(a):
        return [d for d in a if d["kind"] == "AppProject"][0]["spec"]

    assert _rules(argo, rendered, lambda a: project(a).update(sourceRepos=["*"])) == [
        "AppProject sourceRepos must be this one repository, not ['*']",
        "stopmonitor-staging: repoURL not in the project's sourceRepos",
        "stopmonitor-production: repoURL not in the project's sourceRepos",
    ]
    assert _rules(argo, rendered, lambda a: project(a)["destinations"].append(
        {"server": "https://kubernetes.default.svc", "namespace": "*"})) == [
        "AppProject destinations [('https://kubernetes.default.svc', '*'), ('https://kubernetes.default.svc', 'robson'),"
        " ('https://kubernetes.default.svc', 'staging')] != [('https://kubernetes.default.svc', 'robson'),"
        " ('https://kubernetes.default.svc', 'staging')]"
    ]
    assert _rules(argo, rendered, lambda a: app(a, "stopmonitor-staging")["spec"]["syncPolicy"]["automated"].update(
        selfHeal=False)) == ["stopmonitor-staging: staging must sync automatically with prune and selfHeal"]
    assert _rules(argo, rendered, lambda a: app(a, "stopmonitor-production")["spec"]["syncPolicy"].update(
        automated={"prune": True})) == ["stopmonitor-production: production must sync by hand (no syncPolicy.automated)"]
    assert _rules(argo, rendered, lambda a: app(a, "stopmonitor-staging")["spec"]["syncPolicy"]["syncOptions"].append(
        "ServerSideApply=true")) == ["stopmonitor-staging: ServerSideApply is not used (perpetual OutOfSync elsewhere)"]

    def annotate(r):
        doc(r["stopmonitor-production"], "Deployment", "backend-production")["metadata"]["annotations"] = {
            "argocd.argoproj.io/sync-options": "Replace=false,ServerSideApply=true"}

    assert _rules(argo, rendered, mutate_rendered=annotate) == [
        "stopmonitor-production: Deployment/backend-production: ServerSideApply sync option"]

    def unhook(r):
        doc(r["stopmonitor-staging"], "Job", "stopmonitor-migrate")["metadata"]["annotations"].pop("argocd.argoproj.io/hook")

    assert _rules(argo, rendered, mutate_rendered=unhook) == ["stopmonitor-staging: stopmonitor-migrate is not a PreSync hook"]

    def elsewhere(r):
        doc(r["stopmonitor-staging"], "Service", "backend-staging")["metadata"]["namespace"] = "robson"

    assert _rules(argo, rendered, mutate_rendered=elsewhere) == [
        "stopmonitor-staging: Service/backend-staging: namespace robson is not staging"]


def test_the_backfill_job_in_argo_cds_rendering_fails(argo, rendered):
    unpatched = copy.deepcopy(app(argo, "stopmonitor-staging"))
    unpatched["spec"]["source"]["kustomize"].pop("patches")
    with_backfill = {**rendered, "stopmonitor-staging": check.render_application(unpatched)}
    assert check.argocd_rules(argo, with_backfill) == [
        "stopmonitor-staging: the backfill Job is in what Argo CD syncs"]


def test_the_monitor_never_runs_twice_during_a_rollout(rendered):
    docs = copy.deepcopy(rendered["stopmonitor-staging"])
    assert doc(docs, "CronJob", "stopmonitor-monitor-stops")["spec"]["concurrencyPolicy"] == "Forbid"
    assert check.single_monitor("s", docs) == []
    doc(docs, "CronJob", "stopmonitor-monitor-stops")["spec"]["concurrencyPolicy"] = "Allow"
    assert check.single_monitor("s", docs) == ["s: CronJob/stopmonitor-monitor-stops is not concurrencyPolicy Forbid"]
    # the stream Deployment (issue #15), when the overlays carry it: one replica, Recreate
    stream = copy.deepcopy(doc(docs, "Deployment", "stopmonitor-outbox-relay"))
    stream["metadata"].update(name="stopmonitor-stream", labels={"app.kubernetes.io/component": "stream"})
    stream["spec"]["replicas"] = 1
    assert check.single_monitor("s", [stream]) == [
        "s: Deployment/stopmonitor-stream must be one replica with strategy Recreate"]
    stream["spec"]["strategy"] = {"type": "Recreate"}
    assert check.single_monitor("s", [stream]) == []
    present = [d for d in docs if d["kind"] == "Deployment"
               and "stream" in d["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")]
    for deployment in present:  # the real one, if this branch has it
        assert deployment["spec"]["strategy"]["type"] == "Recreate"


# --------------------------------------------------------------------------- workflows


def test_workflow_rules(tmp_path):
    assert check.workflow_rules(ROOT / ".github" / "workflows" / "ci.yml") == []
    path = tmp_path / "broken-test.yml"
    text = """\
name: x
on: push
permissions:
  contents: write
jobs:
  test:
    runs-on: ubuntu-24.04
    permissions:
      contents: write
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@5fda3b95a4ea91299a34e894583c3862153e4b97
      - uses: ./.github/actions/local
  other:
    runs-on: ubuntu-24.04
    steps:
      - run: true
"""
    path.write_text(text)
    assert check.workflow_rules(path) == [
        f"{path}:11: actions/checkout@v4 is not pinned to a full commit SHA",
        f"{path}:12: actions/setup-python@5fda3b95a4ea91299a34e894583c3862153e4b97"
        " has no '# vX.Y.Z' comment naming its version",
        f"{path}: the workflow-wide permissions must be {{}} (each job asks for its own)",
        f"{path}: the test job (also run for pull requests) writes",
        f"{path}: job other has no permissions block",
    ]


def test_actionlint_and_yamllint_catch_what_they_are_run_for(tmp_path):
    """The linters of ``make check-deploy`` (from requirements-ci.txt) run offline and fail on a broken workflow."""
    bin_dir = Path(sys.executable).parent
    actionlint, yamllint = bin_dir / "actionlint", bin_dir / "yamllint"
    if not (actionlint.is_file() and yamllint.is_file()):
        pytest.skip("requirements-ci.txt not installed")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    good = subprocess.run([str(actionlint), str(ROOT / ".github" / "workflows" / "ci.yml")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert good.returncode == 0, good.stdout
    broken = tmp_path / "broken.yml"
    broken.write_text("""\
on: pull_request
permissions: {}
jobs:
  t:
    runs-on: ubuntu-24.04
    permissions: {contents: read}
    steps:
      - run: echo "${{ github.event.pull_request.title }}"
      - run: echo $UNQUOTED
        timeout: 5
""")
    result = subprocess.run([str(actionlint), "-no-color", str(broken)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 1
    assert "potentially untrusted" in result.stdout  # script injection from a PR title
    assert 'unexpected key "timeout"' in result.stdout
    assert "SC2086" in result.stdout  # shellcheck ran on the run: script
    result = subprocess.run([str(yamllint), "--strict", "-c", str(ROOT / ".yamllint.yaml"), str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout  # valid YAML: yamllint has nothing to say
    broken.write_text("a: 1\na: 2\nb:  [1,2]\n")
    result = subprocess.run([str(yamllint), "--strict", "-c", str(ROOT / ".yamllint.yaml"), str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "duplication of key" in result.stdout
