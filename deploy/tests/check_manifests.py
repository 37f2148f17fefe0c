#!/usr/bin/env python3
"""Checks on the deploy/ files that the generic validators cannot make. Run by
.ci/deploy-checks; needs PyYAML and jsonschema (both come with kubernetes-validate).

    check_manifests.py invariants RENDERED.yaml...   what the Deployment must keep (issue 6)
    check_manifests.py crds RENDERED.yaml...         cert-manager / prometheus-operator kinds
    check_manifests.py dashboard DASHBOARD.json OUT  JSON shape; PromQL to OUT for promtool
    check_manifests.py metrics FILE...               metric names exist in the SPEC or src/

Each prints one line per problem and exits 1 if there was any.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import tomllib

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.dirname(HERE)
ROOT = os.path.dirname(DEPLOY)

PROBLEMS: list[str] = []


def problem(msg: str) -> None:
    PROBLEMS.append(msg)
    print(f"  problem: {msg}")


def load_docs(paths):
    docs = []
    for path in paths:
        with open(path) as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d)
    return docs


def duration_seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"bad duration {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


# --- invariants ------------------------------------------------------------


def check_container_hardening(c: dict, pod_sc: dict) -> None:
    name = c["name"]
    sc = c.get("securityContext", {})
    if sc.get("allowPrivilegeEscalation") is not False:
        problem(f"container {name}: allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        problem(f"container {name}: readOnlyRootFilesystem must be true")
    if sc.get("privileged"):
        problem(f"container {name}: must not be privileged")
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        problem(f"container {name}: runAsNonRoot must be true")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problem(f"container {name}: capabilities must drop ALL")
    if sc.get("capabilities", {}).get("add"):
        problem(f"container {name}: adds capabilities")
    seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
    if seccomp.get("type") != "RuntimeDefault":
        problem(f"container {name}: seccompProfile must be RuntimeDefault")
    res = c.get("resources", {})
    if not res.get("requests", {}).get("memory") or not res.get("limits", {}).get("memory"):
        problem(f"container {name}: needs memory requests and limits")
    if not res.get("requests", {}).get("cpu"):
        problem(f"container {name}: needs a cpu request")
    for m in c.get("volumeMounts", []):
        if m.get("subPath") or m.get("subPathExpr"):
            problem(f"container {name}: volume {m['name']} is mounted with subPath (never updates)")


def check_probe(c: dict, kind: str, path: str, port: str) -> None:
    probe = c.get(kind)
    if not probe:
        problem(f"container {c['name']}: no {kind}")
        return
    get = probe.get("httpGet", {})
    if get.get("path") != path or get.get("port") != port:
        problem(f"container {c['name']}: {kind} must be httpGet {path} on port {port!r}, is {get}")


def invariants(paths) -> None:
    docs = load_docs(paths)
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        problem(f"expected one Deployment, found {len(deployments)}")
        return
    dep = deployments[0]
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    pod_sc = pod.get("securityContext", {})
    with open(os.path.join(DEPLOY, "config.toml"), "rb") as f:
        config = tomllib.load(f)

    if pod.get("automountServiceAccountToken") is not False:
        problem("pod: automountServiceAccountToken must be false")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problem("pod: securityContext.seccompProfile must be RuntimeDefault")
    if not pod_sc.get("runAsNonRoot"):
        problem("pod: securityContext.runAsNonRoot must be true")

    sidecars = [c for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    gate = next((c for c in sidecars if c["name"] == "chatkit-gate"), None)
    if gate is None:
        problem("chatkit-gate must be a native sidecar: an initContainer with restartPolicy Always")
        return
    all_containers = pod.get("initContainers", []) + pod["containers"]
    for c in all_containers:
        check_container_hardening(c, pod_sc)

    ports = {p["name"]: p["containerPort"] for p in gate.get("ports", [])}
    for name, key in (("https", "listen"), ("http", "redirect_listen")):
        if name not in ports:
            problem(f"chatkit-gate: no container port named {name}")
        elif key in config["server"] and port_of(config["server"][key]) != ports[name]:
            problem(f"chatkit-gate: port {name} ({ports[name]}) differs from server.{key}")
    admin_port = port_of(config.get("admin", {}).get("listen", "0.0.0.0:9090"))
    if ports.get("admin") != admin_port:
        problem(f"chatkit-gate: port admin must be {admin_port} (admin.listen)")
    check_probe(gate, "startupProbe", "/readyz", "admin")
    check_probe(gate, "readinessProbe", "/readyz", "admin")
    check_probe(gate, "livenessProbe", "/healthz", "admin")

    app = pod["containers"]
    if not any(c.get("readinessProbe") for c in app):
        problem("app container: no readinessProbe")
    upstream_port = re.search(r":(\d+)", config["upstream"]["url"])
    for c in app:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        if upstream_port and env.get("PORT") not in (None, upstream_port.group(1)):
            problem(f"container {c['name']}: PORT {env.get('PORT')} is not upstream.url's port")

    grace = duration_seconds(config["server"].get("shutdown_grace", "25s"))
    pre_stop = max(
        (c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0) for c in app),
        default=0,
    )
    delay = duration_seconds(config["server"].get("shutdown_delay", "5s"))
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if tgps <= grace + delay + pre_stop:
        problem(f"terminationGracePeriodSeconds {tgps} must exceed shutdown_grace {grace:g}s "
                f"+ shutdown_delay {delay:g}s + the app's preStop {pre_stop}s")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in gate.get("volumeMounts", [])}

    def volume_for(path: str):
        directory = os.path.dirname(path)
        name = mounts.get(directory)
        return volumes.get(name) if name else None

    config_arg = next((a for a in gate.get("args", []) if a.endswith(".toml")), None)
    config_volume = volume_for(config_arg) if config_arg else None
    if not config_volume or "configMap" not in config_volume:
        problem("chatkit-gate: --config is not read from a mounted ConfigMap directory")
    else:
        cm_name = config_volume["configMap"]["name"]
        cms = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
        if cm_name not in cms:
            problem(f"ConfigMap {cm_name} is referenced but not generated")
        elif not re.fullmatch(r"chatkit-gate-config-[a-z0-9]{10}", cm_name):
            problem(f"ConfigMap {cm_name} has no content hash: config changes would not roll pods")
        elif os.path.basename(config_arg) not in cms[cm_name].get("data", {}):
            problem(f"ConfigMap {cm_name} has no key {os.path.basename(config_arg)}")

    tls = config.get("tls", {})
    certs = by_kind.get("Certificate", [])
    if tls.get("cert_file"):
        vol = volume_for(tls["cert_file"])
        if not vol or "secret" not in vol:
            problem("tls.cert_file's directory is not a mounted Secret")
        elif not any(c["spec"]["secretName"] == vol["secret"]["secretName"] for c in certs):
            problem(f"TLS Secret {vol['secret']['secretName']} is not a cert-manager Certificate's")
        if os.path.dirname(tls["cert_file"]) != os.path.dirname(tls.get("key_file", "")):
            problem("tls.cert_file and tls.key_file must be in the same mounted directory")

    chatkit = config.get("chatkit", {})
    if "api_key_file" in chatkit:
        vol = volume_for(chatkit["api_key_file"])
        if not vol or "secret" not in vol:
            problem("chatkit.api_key_file's directory is not a mounted Secret")
    elif "api_key_env" in chatkit:
        if not any(e["name"] == chatkit["api_key_env"] for e in gate.get("env", [])):
            problem(f"chatkit.api_key_env {chatkit['api_key_env']} is not set on the container")
    redis_env = config.get("rate_limit", {}).get("redis_url_env")
    if redis_env:
        for c in [gate] + [c for c in pod.get("initContainers", []) if c is not gate]:
            env = {e["name"]: e for e in c.get("env", [])}
            if "secretKeyRef" not in env.get(redis_env, {}).get("valueFrom", {}):
                problem(f"container {c['name']}: {redis_env} must come from a Secret")

    def selects(selector: dict) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    services = by_kind.get("Service", [])
    if not services:
        problem("no Service")
    for svc in services:
        if not all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items()):
            problem(f"Service {svc['metadata']['name']} does not select the pods")
        https = [p for p in svc["spec"]["ports"] if p["port"] == 443]
        if not https or https[0].get("targetPort") != "https":
            problem(f"Service {svc['metadata']['name']}: port 443 must target the named port https")
        if any(p.get("targetPort") in ("admin", admin_port) for p in svc["spec"]["ports"]):
            problem(f"Service {svc['metadata']['name']} exposes the admin port")
    for pm in by_kind.get("PodMonitor", []):
        if not selects(pm["spec"]["selector"]):
            problem("PodMonitor does not select the pods")
        if [e.get("port") for e in pm["spec"]["podMetricsEndpoints"]] != ["admin"]:
            problem("PodMonitor must scrape the port named admin")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not selects(pdb["spec"]["selector"]):
            problem("PodDisruptionBudget does not select the pods")
    if not by_kind.get("PrometheusRule"):
        problem("no PrometheusRule")
    if not PROBLEMS:
        print(f"  ok: {len(all_containers)} containers hardened, native sidecar, probes, "
              "mounts, ports, Service, PodMonitor, grace period")


# --- custom resources --------------------------------------------------------


def strict(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": STR, "namespace": STR, "labels": STRMAP, "annotations": STRMAP}}
DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"}
PROM_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SELECTOR = strict({"matchLabels": STRMAP, "matchExpressions": {"type": "array"}})
ISSUER_REF = strict({"name": STR, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": STR},
                    ["name"])


def resource(api_version: str, kind: str, spec: dict) -> dict:
    return strict({"apiVersion": {"const": api_version}, "kind": {"const": kind},
                   "metadata": METADATA, "spec": spec}, ["apiVersion", "kind", "metadata", "spec"])


CRD_SCHEMAS = {
    ("cert-manager.io/v1", "Certificate"): resource("cert-manager.io/v1", "Certificate", strict({
        "secretName": STR, "commonName": STR, "dnsNames": {"type": "array", "items": STR},
        "ipAddresses": {"type": "array", "items": STR}, "duration": DURATION,
        "renewBefore": DURATION, "issuerRef": ISSUER_REF, "isCA": BOOL,
        "secretTemplate": strict({"labels": STRMAP, "annotations": STRMAP}),
        "privateKey": strict({
            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": INT,
            "encoding": {"enum": ["PKCS1", "PKCS8"]},
            "rotationPolicy": {"enum": ["Never", "Always"]}}),
        "usages": {"type": "array", "items": {"enum": [
            "signing", "digital signature", "content commitment", "key encipherment",
            "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
            "decipher only", "any", "server auth", "client auth", "code signing",
            "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
            "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]}},
    }, ["secretName", "issuerRef"])),
    ("cert-manager.io/v1", "Issuer"): resource("cert-manager.io/v1", "Issuer", {
        "type": "object", "minProperties": 1, "maxProperties": 1,
        "properties": {"selfSigned": {"type": "object"}, "ca": {"type": "object"},
                       "acme": {"type": "object"}, "vault": {"type": "object"},
                       "venafi": {"type": "object"}},
        "additionalProperties": False}),
    ("monitoring.coreos.com/v1", "PodMonitor"): resource("monitoring.coreos.com/v1", "PodMonitor",
        strict({
            "selector": SELECTOR, "jobLabel": STR,
            "namespaceSelector": strict({"any": BOOL, "matchNames": {"type": "array"}}),
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": strict({
                "port": STR, "portNumber": INT, "path": STR, "scheme": {"enum": ["http", "https"]},
                "interval": PROM_DURATION, "scrapeTimeout": PROM_DURATION, "honorLabels": BOOL,
                "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}})},
        }, ["selector", "podMetricsEndpoints"])),
    ("monitoring.coreos.com/v1", "PrometheusRule"): resource(
        "monitoring.coreos.com/v1", "PrometheusRule", strict({
            "groups": {"type": "array", "minItems": 1, "items": strict({
                "name": STR, "interval": PROM_DURATION, "limit": INT,
                "rules": {"type": "array", "minItems": 1, "items": {
                    "oneOf": [
                        strict({"alert": STR, "expr": STR, "for": PROM_DURATION,
                                "keep_firing_for": PROM_DURATION,
                                "labels": strict({"severity": {"enum": ["critical", "warning", "info"]}}, ["severity"]),
                                "annotations": strict({"summary": STR, "description": STR,
                                                       "runbook_url": STR}, ["summary", "description"])},
                               ["alert", "expr", "labels", "annotations"]),
                        strict({"record": STR, "expr": STR, "labels": STRMAP}, ["record", "expr"]),
                    ]}}}, ["name", "rules"])}}, ["groups"])),
}


def crds(paths) -> None:
    seen = 0
    for doc in load_docs(paths):
        schema = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is None:
            continue
        seen += 1
        name = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
        for err in errors:
            path = ".".join(str(p) for p in err.absolute_path)
            problem(f"{name}: {path}: {err.message}")
        if not errors:
            print(f"  ok {name}")
    print(f"  {seen} custom resources checked")


# --- dashboard -----------------------------------------------------------------


def dashboard(path: str, out_rules: str) -> None:
    with open(path) as f:
        dash = json.load(f)
    for key in ("uid", "title", "panels", "templating", "schemaVersion"):
        if key not in dash:
            problem(f"dashboard: no {key}")
    ids = [p.get("id") for p in dash.get("panels", [])]
    if len(ids) != len(set(ids)):
        problem("dashboard: duplicate panel ids")
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    rules = []
    for p in dash.get("panels", []):
        if p.get("type") == "row":
            continue
        title = p.get("title", "?")
        grid = p.get("gridPos", {})
        if not all(k in grid for k in ("h", "w", "x", "y")) or grid["x"] + grid["w"] > 24:
            problem(f"dashboard panel {title!r}: bad gridPos {grid}")
        if not p.get("targets"):
            problem(f"dashboard panel {title!r}: no queries")
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            if not expr:
                problem(f"dashboard panel {title!r}: empty query")
                continue
            for var in re.findall(r"\$(\w+)", expr):
                if not var.startswith("__") and var not in variables:
                    problem(f"dashboard panel {title!r}: unknown variable ${var}")
            concrete = re.sub(r"\$__(rate_interval|interval|range)", "5m", expr)
            concrete = re.sub(r"\$\w+", ".*", concrete)
            rules.append({"record": f"dashboard:panel_{p['id']}:{t['refId'].lower()}",
                          "expr": concrete})
    with open(out_rules, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f)
    print(f"  {len([p for p in dash['panels'] if p.get('type') != 'row'])} panels, "
          f"{len(rules)} queries written to {out_rules} for promtool")


# --- metric names --------------------------------------------------------------


def known_metrics() -> tuple[set[str], list[str]]:
    names: set[str] = set()
    sources = []
    spec = os.path.join(os.path.dirname(ROOT), "shared", "SPEC.md")
    if os.path.exists(spec):
        with open(spec) as f:
            names |= set(re.findall(r"`(chatkit_gate_[a-z0-9_]+)`", f.read()))
        sources.append("SPEC.md")
    src = glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True)
    for path in src:
        with open(path) as f:
            names |= set(re.findall(r'"(chatkit_gate_[a-z0-9_]+)"', f.read()))
    if src:
        sources.append("src/")
    return names, sources


def metrics(paths) -> None:
    known, sources = known_metrics()
    if not known:
        print("  skipped: neither ../shared/SPEC.md nor src/ names any metric")
        return
    used: set[str] = set()
    for path in paths:
        with open(path) as f:
            used |= set(re.findall(r"chatkit_gate_[a-z0-9_]+", f.read()))
    for name in sorted(used):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in known and base not in known:
            problem(f"metric {name} is used in {', '.join(map(os.path.basename, paths))} "
                    f"but defined in neither {' nor '.join(sources)}")
    print(f"  {len(used)} metric names used, all checked against {' and '.join(sources)}")


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "invariants":
        invariants(args)
    elif cmd == "crds":
        crds(args)
    elif cmd == "dashboard":
        dashboard(args[0], args[1])
    elif cmd == "metrics":
        metrics(args)
    else:
        print(__doc__)
        return 2
    if PROBLEMS:
        print(f"  {len(PROBLEMS)} problem(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
