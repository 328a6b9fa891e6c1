"""deploy/scripts/promote.py in a scratch git repository: set, refuse, commit, roll back."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "scripts" / "promote.py"
IMAGE = "ghcr.io/ldamasio/rbs-backend-monolith"
STAGING = """\
# a comment that must survive
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: staging
resources:
  - ../../base
images:
  - name: other
    newTag: "1.0"
  - name: stopmonitor
    newName: registry.example/stopmonitor
    newTag: sha-{old}  # trailing comment replaced
labels:
  - pairs: {{a: b}}
"""
PRODUCTION = """\
namespace: robson
images:
  - name: stopmonitor
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    (tmp_path / "deploy" / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, tmp_path / "deploy" / "scripts" / "promote.py")
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "config", "user.email", "ci@example.invalid")
    git(tmp_path, "config", "user.name", "ci")
    git(tmp_path, "commit", "-q", "--allow-empty", "-m", "first")
    first = git(tmp_path, "rev-parse", "HEAD")
    for env, text in (("staging", STAGING.format(old=first)), ("production", PRODUCTION)):
        folder = tmp_path / "deploy" / "k8s" / "overlays" / env
        folder.mkdir(parents=True)
        (folder / "kustomization.yaml").write_text(text)
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "overlays")
    return tmp_path


def promote(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(repo / "deploy" / "scripts" / "promote.py"), *args],
        cwd=repo, capture_output=True, text=True, timeout=30,
    )


def overlay(repo: Path, env: str) -> dict:
    return yaml.safe_load((repo / "deploy" / "k8s" / "overlays" / env / "kustomization.yaml").read_text())


def image(repo: Path, env: str) -> dict:
    (entry,) = [i for i in overlay(repo, env)["images"] if i["name"] == "stopmonitor"]
    return entry


def new_commit(repo: Path, message: str) -> str:
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def test_set_rewrites_only_the_stopmonitor_entry(repo):
    sha = new_commit(repo, "code")
    before = (repo / "deploy/k8s/overlays/staging/kustomization.yaml").read_text()
    result = promote(repo, "set", "staging", f"sha-{sha}")
    assert result.returncode == 0, result.stderr
    after = (repo / "deploy/k8s/overlays/staging/kustomization.yaml").read_text()
    assert image(repo, "staging") == {"name": "stopmonitor", "newName": IMAGE, "newTag": f"sha-{sha}"}
    # everything else as it was, comments included
    assert overlay(repo, "staging")["images"][0] == {"name": "other", "newTag": "1.0"}
    assert overlay(repo, "staging")["labels"] == [{"pairs": {"a": "b"}}]
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert [b.strip() for _, b in changed] == [f"newName: {IMAGE}", f"newTag: sha-{sha}"]
    assert after.startswith("# a comment that must survive\n")
    assert promote(repo, "show", "staging").stdout.strip() == f"sha-{sha}"
    # not committed without --commit
    assert git(repo, "status", "--porcelain") == "M deploy/k8s/overlays/staging/kustomization.yaml"


def test_missing_keys_are_added(repo):
    assert promote(repo, "set", "production", "v1.2.3").returncode == 0
    assert image(repo, "production") == {"name": "stopmonitor", "newName": IMAGE, "newTag": "v1.2.3"}


@pytest.mark.parametrize(
    "env,tag,reason",
    [
        ("staging", "latest", "not an immutable tag"),
        ("staging", "staging-latest", "not an immutable tag"),
        ("staging", "sha-abc1234", "not an immutable tag"),  # short sha: ambiguous, not what the build pushes
        ("staging", "v1.2", "not an immutable tag"),
        ("production", "sha-" + "a" * 40, "production deploys version tags only"),
        ("production", "latest", "production deploys version tags only"),
        ("production", "v01.2.3", "production deploys version tags only"),
        ("qa", "v1.0.0", "no overlay 'qa'"),
        ("../staging", "v1.0.0", "no overlay"),
    ],
)
def test_refuses_floating_or_malformed_tags(repo, env, tag, reason):
    before = {e: overlay(repo, e) for e in ("staging", "production")}
    result = promote(repo, "set", env, tag)
    assert result.returncode == 1
    assert reason in result.stderr and result.stderr.count("\n") == 1
    assert {e: overlay(repo, e) for e in ("staging", "production")} == before


def test_commit_then_rollback_twice(repo):
    original = image(repo, "staging")["newTag"]
    a = new_commit(repo, "code a")
    assert promote(repo, "set", "staging", f"sha-{a}", "--commit").returncode == 0
    b = new_commit(repo, "code b")
    result = promote(repo, "set", "staging", f"sha-{b}", "--commit")
    assert result.returncode == 0 and result.stdout.strip() == f"staging: sha-{a} -> sha-{b} (committed)"
    assert git(repo, "log", "-1", "--format=%s") == f"deploy(staging): promote sha-{b}"
    assert f"Image: {IMAGE}:sha-{b}" in git(repo, "log", "-1", "--format=%b")
    assert git(repo, "status", "--porcelain") == ""
    # the same tag again: nothing to do, no commit
    head = git(repo, "rev-parse", "HEAD")
    assert promote(repo, "set", "staging", f"sha-{b}", "--commit").stdout.strip() == f"staging already deploys sha-{b}"
    assert git(repo, "rev-parse", "HEAD") == head

    dry = promote(repo, "rollback", "staging", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith(f"would revert {head[:12]}")
    assert git(repo, "rev-parse", "HEAD") == head

    first = promote(repo, "rollback", "staging")
    assert first.returncode == 0, first.stderr
    assert image(repo, "staging")["newTag"] == f"sha-{a}"
    assert git(repo, "log", "-1", "--format=%s") == f'Revert "deploy(staging): promote sha-{b}"'
    # the second rollback goes one promotion further back, not forward again
    assert promote(repo, "rollback", "staging").returncode == 0
    assert image(repo, "staging")["newTag"] == original
    nothing = promote(repo, "rollback", "staging")
    assert nothing.returncode == 1 and "no promotion of staging to roll back" in nothing.stderr
    # production's history is its own
    assert promote(repo, "rollback", "production").returncode == 1


def test_if_newer_never_moves_staging_back(repo):
    old = new_commit(repo, "old")
    new = new_commit(repo, "new")
    assert promote(repo, "set", "staging", f"sha-{new}", "--commit", "--if-newer").returncode == 0
    head = git(repo, "rev-parse", "HEAD")
    late = promote(repo, "set", "staging", f"sha-{old}", "--commit", "--if-newer")
    assert late.returncode == 3 and "newer than" in late.stderr
    assert image(repo, "staging")["newTag"] == f"sha-{new}" and git(repo, "rev-parse", "HEAD") == head
    # without --if-newer a person may point staging at an older commit on purpose
    assert promote(repo, "set", "staging", f"sha-{old}").returncode == 0


def test_rollback_refuses_a_conflicting_revert_and_leaves_the_tree_clean(repo):
    a = new_commit(repo, "a")
    assert promote(repo, "set", "staging", f"sha-{a}", "--commit").returncode == 0
    # a later hand edit of the same line, not a promotion
    path = repo / "deploy/k8s/overlays/staging/kustomization.yaml"
    path.write_text(path.read_text().replace(f"sha-{a}", "v9.9.9"))
    git(repo, "commit", "-q", "-am", "hand edit")
    head = git(repo, "rev-parse", "HEAD")
    result = promote(repo, "rollback", "staging")
    assert result.returncode == 1 and "does not apply cleanly" in result.stderr
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == ""
