#!/usr/bin/env python3
"""Promotion by commit: set, show or roll back the image tag an overlay deploys.

What Argo CD deploys is the ``images:`` entry named ``stopmonitor`` of
``deploy/k8s/overlays/<environment>/kustomization.yaml``; this script is the one place that
writes it, used by the main build (``.github/workflows/ci.yml``) and by hand::

    deploy/scripts/promote.py set staging sha-<40 hex> [--commit] [--if-newer]
    deploy/scripts/promote.py set production v1.4.0 [--commit]
    deploy/scripts/promote.py show staging
    deploy/scripts/promote.py rollback staging [--dry-run]

Tags are immutable ones only: ``sha-<full commit>`` (staging) or ``vX.Y.Z`` (any environment;
production accepts nothing else). ``set --commit`` records the change as one commit
``deploy(<env>): promote <tag>``; ``rollback`` reverts the newest such commit not reverted yet
(``git revert``, so a second rollback goes one promotion further back). Standard library only
(the workflow runs it on a bare runner). Exit status: 0 done (or nothing to do), 1 refused
(bad tag, nothing to roll back, revert conflict), 2 usage, 3 skipped by ``--if-newer`` (a newer
commit is deployed already: a late build of an older commit never moves staging back).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
IMAGE_NAME = "stopmonitor"  # the name the base's containers use (deploy/k8s/base)
REGISTRY_IMAGE = "ghcr.io/ldamasio/rbs-backend-monolith"
SHA_TAG = re.compile(r"sha-[0-9a-f]{40}")
VERSION_TAG = re.compile(r"v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
SUBJECT = "deploy({env}): promote {tag}"


class Refused(Exception):
    """The change is not made: the message says why (one line)."""

    status = 1


class NotNewer(Refused):
    """``--if-newer``: the deployed commit is newer than the one offered."""

    status = 3


def check_tag(env: str, tag: str) -> None:
    """Refuse a floating or malformed tag; production takes version tags only."""
    if VERSION_TAG.fullmatch(tag):
        return
    if env == "production":
        raise Refused(f"production deploys version tags only (vX.Y.Z), not {tag!r}")
    if not SHA_TAG.fullmatch(tag):
        raise Refused(f"{tag!r} is not an immutable tag: use sha-<40-hex commit> or vX.Y.Z")


def kustomization(env: str) -> Path:
    path = OVERLAYS / env / "kustomization.yaml"
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", env) or not path.is_file():
        raise Refused(f"no overlay {env!r} (looked for {path.relative_to(ROOT)})")
    return path


@dataclass
class ImageEntry:
    """Where the ``stopmonitor`` item of ``images:`` sits in the file's lines."""

    start: int  # index of the "- name: stopmonitor" line (or of the item's first line)
    end: int  # one past the item's last line
    indent: str  # indentation of the item's keys


def find_entry(lines: list[str]) -> ImageEntry:
    """Locate the ``images:`` item named ``stopmonitor`` (block style YAML, as the overlays write it)."""
    try:
        top = next(i for i, line in enumerate(lines) if re.fullmatch(r"images:\s*(#.*)?", line.rstrip("\n")))
    except StopIteration:
        raise Refused("the kustomization has no top-level images: list") from None
    end = next((i for i in range(top + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    items = [i for i in range(top + 1, end) if re.match(r"\s*- ", lines[i])]
    for n, start in enumerate(items):
        stop = items[n + 1] if n + 1 < len(items) else end
        dash = re.match(r"(\s*)- ", lines[start])
        indent = dash.group(1) + "  "
        body = [lines[start][dash.end():]] + [line[len(indent):] for line in lines[start + 1 : stop]]
        if any(re.fullmatch(rf"name:\s*{IMAGE_NAME}\s*", b.rstrip("\n")) for b in body):
            return ImageEntry(start, stop, indent)
    raise Refused(f"no images: entry named {IMAGE_NAME}")


def read_tag(env: str) -> str | None:
    lines = kustomization(env).read_text().splitlines(keepends=True)
    entry = find_entry(lines)
    for i in range(entry.start, entry.end):
        match = re.match(r"\s*(?:- )?newTag:\s*['\"]?([^'\"\s#]+)", lines[i])
        if match:
            return match.group(1)
    return None


def write_tag(env: str, tag: str) -> bool:
    """Set ``newName`` to the registry image and ``newTag`` to ``tag``; False when already so."""
    path = kustomization(env)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    entry = find_entry(lines)
    wanted = {"newName": REGISTRY_IMAGE, "newTag": tag}
    for key, value in wanted.items():
        for i in range(entry.start, entry.end):
            match = re.match(rf"(\s*(?:- )?){key}:", lines[i])
            if match:
                lines[i] = f"{match.group(1)}{key}: {value}\n"
                break
        else:
            lines.insert(entry.end, f"{entry.indent}{key}: {value}\n")
            entry.end += 1
    new = "".join(lines)
    if new == text:
        return False
    path.write_text(new)
    return True


def git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise Refused(f"git {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def is_ancestor(old: str, new: str) -> bool | None:
    """Whether commit ``old`` is an ancestor of ``new``; None when ``old`` is unknown here."""
    if git("cat-file", "-e", f"{old}^{{commit}}", check=False).returncode != 0:
        return None
    return git("merge-base", "--is-ancestor", old, new, check=False).returncode == 0


def cmd_set(env: str, tag: str, commit: bool, if_newer: bool) -> str:
    check_tag(env, tag)
    current = read_tag(env)
    if if_newer and current and SHA_TAG.fullmatch(current) and SHA_TAG.fullmatch(tag) and current != tag:
        if is_ancestor(tag[4:], current[4:]):
            raise NotNewer(f"{env} already runs {current}, newer than {tag}: not moving it back")
    if not write_tag(env, tag):
        return f"{env} already deploys {tag}"
    if commit:
        path = kustomization(env).relative_to(ROOT)
        git("add", str(path))
        git("commit", "-q", "-m", SUBJECT.format(env=env, tag=tag), "-m",
            f"Image: {REGISTRY_IMAGE}:{tag}\nPrevious: {current}\nEnvironment: {env}", "--", str(path))
    return f"{env}: {current} -> {tag}" + (" (committed)" if commit else "")


def promotions(env: str) -> list[str]:
    """Commits (newest first) promoting ``env`` that no later commit has reverted."""
    path = str(kustomization(env).relative_to(ROOT))
    log = git("log", "--format=%H%x00%s%x00%b%x1e", "--", path).stdout
    reverted: set[str] = set()
    found: list[str] = []
    for record in log.split("\x1e"):
        if not record.strip():
            continue
        sha, subject, body = record.strip("\n").split("\x00", 2)
        reverted.update(re.findall(r"This reverts commit ([0-9a-f]{40})", body))
        if subject.startswith(f"deploy({env}): promote ") and sha not in reverted:
            found.append(sha)
    return found


def cmd_rollback(env: str, dry_run: bool) -> str:
    candidates = promotions(env)
    if not candidates:
        raise Refused(f"no promotion of {env} to roll back")
    sha = candidates[0]
    current = read_tag(env)
    if dry_run:
        return f"would revert {sha[:12]} ({git('log', '-1', '--format=%s', sha).stdout.strip()})"
    result = git("revert", "--no-edit", sha, check=False)
    if result.returncode != 0:
        git("revert", "--abort", check=False)
        raise Refused(f"git revert {sha[:12]} does not apply cleanly; set an older tag instead: "
                      f"{result.stderr.strip() or result.stdout.strip()}")
    return f"{env}: {current} -> {read_tag(env)} (reverted {sha[:12]})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_set = sub.add_parser("set", help="point an overlay at an immutable image tag")
    p_set.add_argument("env")
    p_set.add_argument("tag")
    p_set.add_argument("--commit", action="store_true", help="commit the change (deploy(<env>): promote <tag>)")
    p_set.add_argument("--if-newer", action="store_true",
                       help="refuse a sha- tag whose commit is an ancestor of the one deployed")
    p_show = sub.add_parser("show", help="print the tag an overlay deploys")
    p_show.add_argument("env")
    p_back = sub.add_parser("rollback", help="revert the newest promotion commit of an overlay")
    p_back.add_argument("env")
    p_back.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "set":
            print(cmd_set(args.env, args.tag, args.commit, args.if_newer))
        elif args.command == "show":
            print(read_tag(args.env) or "")
        else:
            print(cmd_rollback(args.env, args.dry_run))
    except Refused as error:
        print(f"promote: {error}", file=sys.stderr)
        return error.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
