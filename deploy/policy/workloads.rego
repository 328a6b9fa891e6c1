# Policy on the rendered manifests of one environment (deploy/scripts/check_deploy.py runs it
# through regopy on `kubectl kustomize` of each overlay, as its Argo CD Application renders it).
#
# input: {"environment": "staging" | "production" | ..., "documents": [<manifest>, ...]}
# data.stopmonitor.policy.deny: a set of one-line messages; empty = the environment passes.
#
# Every container of every workload (Deployment, StatefulSet, DaemonSet, Job, CronJob; init
# containers included) must:
#   - run as non-root: runAsNonRoot true (container, or pod when the container does not say) and
#     no runAsUser 0;
#   - have a read-only root filesystem and no privilege escalation;
#   - set requests and limits for cpu and memory;
#   - use an immutable image reference: a digest, sha-<40 hex> or vX.Y.Z; production takes a
#     digest or vX.Y.Z only (never latest, staging-latest, a branch name or no tag).
# Long-running containers (Deployment, StatefulSet, DaemonSet) must have a liveness probe, and a
# readiness probe when they declare a port (they receive traffic). Jobs and CronJobs run to
# completion: the kubelet has nothing to restart or take out of a Service, so no probe is asked.
package stopmonitor.policy

import rego.v1

long_running := {"Deployment", "StatefulSet", "DaemonSet"}

workload_kinds := long_running | {"Job", "CronJob"}

pod_spec(doc) := doc.spec.jobTemplate.spec.template.spec if doc.kind == "CronJob"

pod_spec(doc) := doc.spec.template.spec if doc.kind != "CronJob"

containers(doc) := array.concat(object.get(pod_spec(doc), "containers", []), object.get(pod_spec(doc), "initContainers", []))

workload_containers contains [doc, c] if {
	some doc in input.documents
	doc.kind in workload_kinds
	some c in containers(doc)
}

where(doc, c) := sprintf("%s %s/%s container %s", [input.environment, doc.kind, doc.metadata.name, c.name])

# --------------------------------------------------------------------------- non-root

container_or_pod(doc, c, key) := c.securityContext[key]

container_or_pod(doc, c, key) := pod_spec(doc).securityContext[key] if {
	not has_key(object.get(c, "securityContext", {}), key)
}

has_key(obj, key) if _ = obj[key]

deny contains msg if {
	some [doc, c] in workload_containers
	not container_or_pod(doc, c, "runAsNonRoot") == true
	msg := sprintf("%s: runAsNonRoot is not true", [where(doc, c)])
}

deny contains msg if {
	some [doc, c] in workload_containers
	container_or_pod(doc, c, "runAsUser") == 0
	msg := sprintf("%s: runs as uid 0", [where(doc, c)])
}

# --------------------------------------------------------------------------- read-only root

deny contains msg if {
	some [doc, c] in workload_containers
	not c.securityContext.readOnlyRootFilesystem == true
	msg := sprintf("%s: readOnlyRootFilesystem is not true", [where(doc, c)])
}

deny contains msg if {
	some [doc, c] in workload_containers
	not c.securityContext.allowPrivilegeEscalation == false
	msg := sprintf("%s: allowPrivilegeEscalation is not false", [where(doc, c)])
}

# --------------------------------------------------------------------------- requests and limits

deny contains msg if {
	some [doc, c] in workload_containers
	some section in ["requests", "limits"]
	some resource in ["cpu", "memory"]
	not c.resources[section][resource]
	msg := sprintf("%s: no %s.%s", [where(doc, c), section, resource])
}

# --------------------------------------------------------------------------- probes

deny contains msg if {
	some [doc, c] in workload_containers
	doc.kind in long_running
	some container in pod_spec(doc).containers
	container.name == c.name
	not c.livenessProbe
	msg := sprintf("%s: no livenessProbe", [where(doc, c)])
}

deny contains msg if {
	some [doc, c] in workload_containers
	doc.kind in long_running
	count(object.get(c, "ports", [])) > 0
	not c.readinessProbe
	msg := sprintf("%s: serves a port but has no readinessProbe", [where(doc, c)])
}

# --------------------------------------------------------------------------- immutable images

digest(image) if regex.match(`^[^@\s]+@sha256:[0-9a-f]{64}$`, image)

tag(image) := t if {
	not contains(image, "@")
	parts := split(image, "/")
	last := parts[count(parts) - 1]
	contains(last, ":")
	t := split(last, ":")[1]
}

version_tag(t) if regex.match(`^v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$`, t)

commit_tag(t) if regex.match(`^sha-[0-9a-f]{40}$`, t)

immutable(image) if digest(image)

immutable(image) if version_tag(tag(image))

immutable(image) if {
	input.environment != "production"
	commit_tag(tag(image))
}

deny contains msg if {
	some [doc, c] in workload_containers
	not immutable(c.image)
	input.environment == "production"
	msg := sprintf("%s: image %s is not a version tag vX.Y.Z or a digest", [where(doc, c), c.image])
}

deny contains msg if {
	some [doc, c] in workload_containers
	not immutable(c.image)
	input.environment != "production"
	msg := sprintf("%s: image %s is a floating tag (use sha-<commit>, vX.Y.Z or a digest)", [where(doc, c), c.image])
}
