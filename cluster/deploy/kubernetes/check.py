"""Checks a rendered shoal Kubernetes base (`kubectl kustomize cluster/deploy/kubernetes`)
against what shoal needs, beyond the schemas (kubernetes-validate checks those):

- the coordinator StatefulSet starts every replica the safe way of issue "Acknowledged means
  kept": `--initial-state new` (an empty volume asks its peers before it votes), ids from the
  ordinal, one --peers entry per replica naming its pod through the headless Service, pods
  started in parallel (a fresh group needs its peers up), a volume claim per replica for
  --data, readiness from the gRPC health service on the listening port, and a
  PodDisruptionBudget that keeps a quorum;
- every server starts with --credentials from a Secret volume mounted owner-only (mode 0400;
  never --insecure): each coordinator replica its own folder (the CA's certificate, the token
  key, the first tokens, its certificate and key), readiness from /ready on the HTTP port
  over HTTPS (Kubernetes' gRPC probes cannot speak TLS);
- workers advertise the pod IP (they listen on a wildcard address) on the port they listen on;
- every container runs as non-root with resource requests, and reads its store from the
  ConfigMap shoal-store: a mounted shared folder, or an s3:// bucket with its credentials from
  the Secret shoal-store-credentials (the overlay kubernetes-s3).

Usage: python3 check.py RENDERED.yaml   (exit 1 and one line per problem if any)
"""
import re
import sys

import yaml


def flags(args):
    """--flag value pairs of a shell command line or an argv list."""
    words = args.split() if isinstance(args, str) else list(args)
    out = {}
    for i, w in enumerate(words):
        if w.startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--"):
            out[w] = words[i + 1]
    return out


def secret_volume(pod, container, mount_path):
    """The Secret volume mounted at mount_path, if its files are owner-only."""
    names = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    for v in pod.get("volumes", []):
        if v["name"] in names and "secret" in v:
            mode = v["secret"].get("defaultMode", 0o644)
            return v["secret"] if mode & 0o077 == 0 else None
    return None


def main(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    problems = []

    def need(cond, what):
        if not cond:
            problems.append(what)

    sts = by.get(("StatefulSet", "shoal-coordinator"))
    need(sts is not None, "no StatefulSet shoal-coordinator")
    if sts:
        spec = sts["spec"]
        n = spec.get("replicas", 1)
        need(n % 2 == 1 and n >= 3, f"coordinator replicas {n}: an odd number, at least 3")
        need(spec.get("podManagementPolicy") == "Parallel", "coordinators must start in parallel (OrderedReady waits on pod 0, which cannot be ready alone)")
        svc = by.get(("Service", spec["serviceName"]))
        need(svc is not None and svc["spec"].get("clusterIP") == "None", f"serviceName {spec['serviceName']} must be a headless Service")
        need(svc is not None and svc["spec"].get("publishNotReadyAddresses") is True, "the headless Service must publish not-ready pods (peers meet before any is ready)")
        pod = spec["template"]["spec"]
        c = pod["containers"][0]
        line = " ".join(c.get("command", []) + c.get("args", []))
        f = flags(line)
        need(f.get("--initial-state") == "new", f"--initial-state must be new (the safe start), not {f.get('--initial-state')!r}")
        need("join" not in f.get("--initial-state", ""), "a StatefulSet must never start replicas as join")
        need(re.search(r"--id \$\(\( \$\{HOSTNAME##\*-\} \+ 1 \)\)", line) is not None, "--id must come from the pod's ordinal: $(( ${HOSTNAME##*-} + 1 ))")
        port = f.get("--listen", ":").rsplit(":", 1)[1]
        peers = f.get("--peers", "").split(",")
        want = [f"{i + 1}={sts['metadata']['name']}-{i}.{spec['serviceName']}:{port}" for i in range(n)]
        need(peers == want, f"--peers {peers} must be {want}")
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        claims = [t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])]
        need(any(mounts.get(cl) == f.get("--data") for cl in claims), "--data must be a volume claim template's mount (a log per replica)")
        probe = c.get("readinessProbe", {}).get("httpGet", {})
        http_port = f.get("--http-listen", ":").rsplit(":", 1)[1]
        ports = {p.get("name"): str(p["containerPort"]) for p in c.get("ports", [])}
        need(probe.get("path") == "/ready" and ports.get(probe.get("port"), str(probe.get("port"))) == http_port, "readiness must be /ready on the HTTP port (--http-listen)")
        need(probe.get("scheme") == "HTTPS", "readiness over HTTPS: with credentials the HTTP port speaks only TLS (scheme: HTTPS)")
        need(re.search(r"--credentials /credentials/coordinator-\$\(\( \$\{HOSTNAME##\*-\} \+ 1 \)\)", line) is not None, "coordinators need --credentials /credentials/coordinator-$(( ${HOSTNAME##*-} + 1 ))")
        vol = secret_volume(pod, c, "/credentials")
        need(vol is not None, "coordinators: the credentials Secret mounted at /credentials")
        if vol:
            paths = {i["path"] for i in vol.get("items", [])}
            for r in range(1, n + 1):
                for file in ("ca.crt", "token.key", "bootstrap.pb", "node.crt", "node.key"):
                    need(f"coordinator-{r}/{file}" in paths, f"the credentials volume lacks coordinator-{r}/{file}")
        pdb = [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["spec"]["selector"] == spec["selector"]]
        need(len(pdb) == 1 and pdb[0]["spec"].get("minAvailable") == n // 2 + 1, f"a PodDisruptionBudget with minAvailable {n // 2 + 1} (a quorum of {n})")

    dep = by.get(("Deployment", "shoal-worker"))
    need(dep is not None, "no Deployment shoal-worker")
    if dep:
        c = dep["spec"]["template"]["spec"]["containers"][0]
        f = flags(c.get("args", []))
        env = {e["name"]: e for e in c.get("env", [])}
        listen_port = f.get("--listen", ":").rsplit(":", 1)[1]
        need(f.get("--advertise") == f"$(POD_IP):{listen_port}", f"workers must advertise $(POD_IP):{listen_port}, not {f.get('--advertise')!r}")
        need(f.get("--credentials") == "/credentials" and secret_volume(dep["spec"]["template"]["spec"], c, "/credentials") is not None, "workers need --credentials /credentials, a Secret volume")
        need(env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP", "POD_IP must come from status.podIP")

    store = (by.get(("ConfigMap", "shoal-store")) or {}).get("data", {}).get("store", "")
    need(bool(store), "a ConfigMap shoal-store with the store's location (key store)")
    for d in docs:
        if d["kind"] not in ("StatefulSet", "Deployment"):
            continue
        pod = d["spec"]["template"]["spec"]
        need(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{d['metadata']['name']}: runAsNonRoot")
        for c in pod["containers"]:
            need("--insecure" not in " ".join(c.get("command", []) + c.get("args", [])), f"{d['metadata']['name']}/{c['name']}: --insecure serves plaintext with no tokens")
            need("requests" in c.get("resources", {}), f"{d['metadata']['name']}/{c['name']}: resource requests")
            who = f"{d['metadata']['name']}/{c['name']}"
            ref = {e["name"]: e for e in c.get("env", [])}.get("SHOAL_STORE", {}).get("valueFrom", {}).get("configMapKeyRef", {})
            need(ref.get("name") == "shoal-store" and ref.get("key") == "store", f"{who}: SHOAL_STORE from the ConfigMap shoal-store")
            if store.startswith("s3://"):
                need(any(e.get("secretRef", {}).get("name") == "shoal-store-credentials" for e in c.get("envFrom", [])), f"{who}: the store's credentials from the Secret shoal-store-credentials")
            else:
                need(any(m["mountPath"] == store for m in c.get("volumeMounts", [])), f"{who}: the store mounted at {store}")

    for p in problems:
        print(f"{path}: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
