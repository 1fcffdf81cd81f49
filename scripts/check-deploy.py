#!/usr/bin/env python3
"""Offline checks of the deployment files: Dockerfile, k8s/ (kustomize) and helm/dropline.

No Kubernetes cluster, container registry or helm binary is reachable where this runs, so it
checks what can be checked without them, with the real tools where they exist:

1. Dockerfile: parsed by BuildKit's parser (the `dockerfile` package); multi-stage, a locked
   release build, a non-root runtime user, the entrypoint and port the manifests expect.
2. k8s/: `kubectl kustomize` of the base and the overlays (production-tls: with the TLS
   components); every object validated (strict)
   against the Kubernetes 1.27 and 1.37 schemas (kubernetes-validate); then what schemas
   cannot see: selectors that select, references that resolve, probes on grpc.health.v1 with
   the right service names (kubelet's gRPC probes in plaintext, `dropline health` over TLS),
   a grace period that covers Dropline's drain, resources on every
   container, non-root pods; nats.conf through `nats-server -t`; the Dropline TOML and env
   through `dropline serve --check-config` (with throwaway certificates from `openssl` where
   they name TLS files).
3. helm/dropline: Helm 4's own lint, schema check and renderer (helm-python-sdk, no helm
   binary) on the default values and every file in examples/; the rendered objects go
   through the same checks as 2; a list of bad values must each be refused.
4. Every DROPLINE_* variable and every flag the files use exists in `dropline serve --help`.
5. A rehearsal of the pod lifecycle: 3 NATS servers from the rendered nats.conf and 2
   Dropline nodes from the rendered StatefulSet (env, TOML, args) on loopback; startup,
   liveness and readiness answers as the probes ask them; readiness follows the loss and
   return of NATS; SIGTERM: NOT_SERVING at once, liveness still SERVING, exit within the
   grace period.

Usage: scripts/check-deploy.py [--dropline target/debug/dropline] [--skip-rehearsal]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools" / "deploy"
sys.path.insert(0, str(TOOLS))

import dockerfile  # noqa: E402
import helm_python as helm  # noqa: E402
import jsonschema  # noqa: E402
import kubernetes_validate  # noqa: E402
import yaml  # noqa: E402

KUBECTL = TOOLS / "bin" / "kubectl"
NATS_SERVER = ROOT / ".tools" / "nats" / "bin" / "nats-server"
CHART = ROOT / "helm" / "dropline"
# The oldest Kubernetes the chart allows (gRPC probes are GA from 1.27) and the newest schemas.
K8S_VERSIONS = ["1.27.0", "1.37.0"]
SHUTDOWN_DRAIN_S = 10  # domain::limits::SHUTDOWN_DRAIN_MS


class Checks:
    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def ok(self, cond: bool, what: str) -> bool:
        if cond:
            self.passed += 1
        else:
            self.failures.append(what)
            print(f"  FAIL {what}", flush=True)
        return cond


C = Checks()


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


# ---------------------------------------------------------------------------------------------
# Objects: schema validation and the checks schemas cannot make
# ---------------------------------------------------------------------------------------------


# Custom resources no Kubernetes schema knows: checked by hand (check_service_monitor).
CRD_GROUPS = ("monitoring.coreos.com/",)


def validate_schemas(docs: list[dict], label: str) -> None:
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        for version in K8S_VERSIONS:
            name = f"{label}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version})"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                C.ok(True, name)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                C.ok(False, f"{name}: {path}: {e.message}")
            except Exception as e:  # schema not found and the like
                C.ok(False, f"{name}: {e}")


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in by_kind(docs, kind) if d["metadata"]["name"] == name), None)


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def dropline_statefulset(docs: list[dict]) -> dict:
    for sts in by_kind(docs, "StatefulSet"):
        for c in sts["spec"]["template"]["spec"]["containers"]:
            if c["name"] == "dropline":
                return sts
    raise SystemExit("no StatefulSet with a `dropline` container")


def check_objects(docs: list[dict], label: str, external_secrets: set[str]) -> dict:
    """The checks no schema makes; returns facts the later steps use."""
    kinds = {d["kind"] for d in docs}
    for kind in ["StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"]:
        C.ok(kind in kinds, f"{label}: has a {kind}")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pods = [(s, s["spec"]["template"]) for s in by_kind(docs, "StatefulSet")]

    for sts, tpl in pods:
        sname = sts["metadata"]["name"]
        spec = tpl["spec"]
        C.ok(selects(sts["spec"]["selector"]["matchLabels"], tpl["metadata"]["labels"]),
             f"{label}: StatefulSet {sname} selects its own pods")
        headless = named(docs, "Service", sts["spec"]["serviceName"])
        C.ok(headless is not None and headless["spec"].get("clusterIP") == "None",
             f"{label}: StatefulSet {sname} names a headless Service")
        psc = spec.get("securityContext", {})
        C.ok(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0,
             f"{label}: {sname} pods run as a non-root user")
        claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{label}: {sname}/{c['name']}"
            res = c.get("resources", {})
            C.ok(all(k in res.get("requests", {}) for k in ("cpu", "memory"))
                 and "memory" in res.get("limits", {}), f"{where} has cpu/memory requests and a memory limit")
            C.ok(c.get("securityContext", {}).get("allowPrivilegeEscalation") is False,
                 f"{where} cannot escalate privileges")
            C.ok("livenessProbe" in c and "readinessProbe" in c, f"{where} has liveness and readiness probes")
            for m in c.get("volumeMounts", []):
                C.ok(m["name"] in volumes or m["name"] in claims, f"{where} mounts a volume that exists: {m['name']}")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    C.ok(("ConfigMap", ref["configMapKeyRef"]["name"]) in names, f"{where} env {e['name']}: ConfigMap exists")
                if "secretKeyRef" in ref:
                    s = ref["secretKeyRef"]["name"]
                    C.ok(("Secret", s) in names or s in external_secrets,
                         f"{where} env {e['name']}: Secret {s} is rendered or documented as created by the operator")
        for v in volumes.values():
            if "configMap" in v:
                C.ok(("ConfigMap", v["configMap"]["name"]) in names, f"{label}: {sname} volume {v['name']}: ConfigMap exists")

    for svc in by_kind(docs, "Service"):
        sel = svc["spec"].get("selector", {})
        targets = [(s, t) for s, t in pods if selects(sel, t["metadata"]["labels"])]
        if not C.ok(len(targets) == 1, f"{label}: Service {svc['metadata']['name']} selects exactly one StatefulSet's pods"):
            continue
        ports = {p.get("name") for c in targets[0][1]["spec"]["containers"] for p in c.get("ports", [])}
        ports |= {p["containerPort"] for c in targets[0][1]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            C.ok(p.get("targetPort", p["port"]) in ports, f"{label}: Service {svc['metadata']['name']} port {p['port']} targets a container port")
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        C.ok(sum(selects(sel, t["metadata"]["labels"]) for _, t in pods) == 1,
             f"{label}: PodDisruptionBudget {pdb['metadata']['name']} covers one StatefulSet")

    # Dropline's node: probes, config, grace period, data volume.
    sts = dropline_statefulset(docs)
    spec = sts["spec"]["template"]["spec"]
    c = next(c for c in spec["containers"] if c["name"] == "dropline")
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    http_port = next((p["containerPort"] for p in c["ports"] if p["name"] == "http"), None)
    C.ok(http_port is not None, f"{label}: dropline has a container port named http (/metrics, /readyz)")
    for svc in by_kind(docs, "Service"):
        if selects(svc["spec"].get("selector", {}), sts["spec"]["template"]["metadata"]["labels"]):
            C.ok(any(p.get("targetPort") == "http" for p in svc["spec"]["ports"]),
                 f"{label}: Service {svc['metadata']['name']} exposes the HTTP port")
    annotations = sts["spec"]["template"]["metadata"].get("annotations", {})
    if "prometheus.io/scrape" in annotations:
        C.ok(annotations.get("prometheus.io/port") == str(http_port) and annotations.get("prometheus.io/path") == "/metrics",
             f"{label}: the pods' scrape annotations name the HTTP port {http_port} and /metrics")
    for probe, service in (("startupProbe", "liveness"), ("livenessProbe", "liveness"), ("readinessProbe", "")):
        C.ok(probe_asks(c.get(probe, {}), port, service),
             f"{label}: dropline {probe} asks grpc.health.v1 on port {port} for service {service!r}")
    env = {e["name"]: e for e in c.get("env", [])}
    C.ok(env.get("DROPLINE_NODE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
         f"{label}: the node name is the pod name")
    config_path = env.get("DROPLINE_CONFIG", {}).get("value", "")
    mount = next((m for m in c["volumeMounts"] if config_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    toml_text = None
    if C.ok(mount is not None, f"{label}: DROPLINE_CONFIG ({config_path}) is on a mounted volume"):
        vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        cm = named(docs, "ConfigMap", vol.get("configMap", {}).get("name", ""))
        key = pathlib.PurePosixPath(config_path).name
        if C.ok(cm is not None and key in cm.get("data", {}), f"{label}: the ConfigMap holds {key}"):
            toml_text = cm["data"][key]
    settings = tomllib.loads(toml_text) if toml_text else {}
    C.ok(settings.get("http_listen") == f"0.0.0.0:{http_port}",
         f"{label}: http_listen ({settings.get('http_listen')}) is the container's http port on all interfaces")
    data_mount = next((m for m in c["volumeMounts"] if m["mountPath"] == settings.get("data_dir")), None)
    C.ok(data_mount is not None, f"{label}: data_dir {settings.get('data_dir')} is a mounted volume")
    needed = settings.get("shutdown_delay_ms", 0) / 1000 + SHUTDOWN_DRAIN_S + settings.get("lease_ttl_ms", 5000) / 1000
    grace = spec.get("terminationGracePeriodSeconds", 30)
    C.ok(grace >= needed, f"{label}: grace period {grace} s covers delay + drain + lease round ({needed:.0f} s)")
    C.ok(settings.get("shutdown_delay_ms", 0) > 0, f"{label}: nodes keep serving a moment after SIGTERM (shutdown_delay_ms)")
    startup = c["startupProbe"]
    C.ok(startup["periodSeconds"] * startup["failureThreshold"] >= 90,
         f"{label}: the startup probe allows 90 s or more (the node waits up to 60 s for JetStream)")
    return {"sts": sts, "container": c, "settings": settings, "toml": toml_text, "port": port}


def flag_value(args: list[str], flag: str) -> str | None:
    """The value after `flag` (or in `flag=value`) in a command line."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def probe_asks(probe: dict, port: int, service: str) -> bool:
    """Whether a probe asks grpc.health.v1 on `port` for `service`: kubelet's own gRPC probe
    (plaintext), or, over TLS, `dropline health` run in the container against that port."""
    if "grpc" in probe:
        g = probe["grpc"]
        return g["port"] == port and g.get("service", "") == service
    command = probe.get("exec", {}).get("command", [])
    if not command or not command[0].endswith("/dropline") or command[1:2] != ["health"]:
        return False
    server = flag_value(command, "--server") or ""
    return (re.fullmatch(rf"https://(127\.0\.0\.1|localhost):{port}", server) is not None
            and (flag_value(command, "--service") or "") == service)


def nats_conf(docs: list[dict]) -> tuple[str, dict] | None:
    """The bundled NATS servers' config and StatefulSet, when the objects have them."""
    for sts in by_kind(docs, "StatefulSet"):
        spec = sts["spec"]["template"]["spec"]
        for c in spec["containers"]:
            args = c.get("args", [])
            if "--config" in args:
                path = pathlib.PurePosixPath(args[args.index("--config") + 1])
                m = next(m for m in c["volumeMounts"] if str(path).startswith(m["mountPath"]))
                vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
                cm = named(docs, "ConfigMap", vol["configMap"]["name"])
                return cm["data"][path.name], sts
    return None


def check_nats(docs: list[dict], label: str, facts: dict) -> None:
    found = nats_conf(docs)
    if not C.ok(found is not None, f"{label}: a NATS StatefulSet with its config"):
        return
    conf, sts = found
    replicas = sts["spec"]["replicas"]
    C.ok(replicas >= 3, f"{label}: {replicas} NATS servers (3 or more for a replicated journal)")
    C.ok(re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.M) is not None, f"{label}: JetStream fsyncs every write")
    ping = re.search(r"^\s*ping_interval:\s*\"?(\d+)s\"?\s*$", conf, re.M)
    C.ok(ping is not None and int(ping.group(1)) <= 10,
         f"{label}: NATS pings clients every ≤ 10 s (a silently cut node's subscriptions go within seconds)")
    store = re.search(r"^\s*store_dir:\s*(\S+)", conf, re.M)
    c = sts["spec"]["template"]["spec"]["containers"][0]
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    on_claim = store and any(m["mountPath"] == store.group(1) and m["name"] in claims for m in c["volumeMounts"])
    C.ok(bool(on_claim), f"{label}: JetStream file storage is on a volume claim")
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "nats.conf"
        path.write_text(conf)
        run = subprocess.run([str(NATS_SERVER), "-t", "-c", str(path)], capture_output=True, text=True,
                             env={**os.environ, "POD_NAME": f"{sts['metadata']['name']}-0"})
        C.ok(run.returncode == 0, f"{label}: nats-server -t accepts nats.conf ({(run.stderr or run.stdout).strip()[-200:]})")
    settings = facts["settings"]
    C.ok(settings.get("replicas", 1) <= replicas, f"{label}: journal replicas ({settings.get('replicas')}) ≤ NATS servers")
    headless = sts["spec"]["serviceName"]
    expected = {f"{sts['metadata']['name']}-{i}.{headless}" for i in range(replicas)}
    hosts = {re.sub(r"^\w+://([^:/]+).*$", r"\1", u) for u in settings.get("nats", "").split(",")}
    C.ok(hosts == expected, f"{label}: Dropline lists every NATS server by its stable name ({sorted(hosts)})")


def check_config_with_binary(dropline: pathlib.Path, facts: dict, label: str) -> None:
    """`dropline serve --check-config` with the pod's env, args and mounted TOML."""
    with tempfile.TemporaryDirectory() as tmp:
        env, _ = pod_env(facts, pathlib.Path(tmp), nats=None)
        args = facts["container"].get("args", [])
        run = subprocess.run([str(dropline), *args, "--check-config"], capture_output=True, text=True, env=env)
        out = run.stdout + run.stderr
        pod = f"{facts['sts']['metadata']['name']}-0"
        C.ok(run.returncode == 0 and f'node = "{pod}"' in out,
             f"{label}: dropline {' '.join(args)} --check-config accepts the pod's settings ({out.strip()[-300:]})")


def pod_env(facts: dict, tmp: pathlib.Path, nats: str | None, pod_index: int = 0,
            listen: str | None = None, http_listen: str | None = None) -> tuple[dict, pathlib.Path]:
    """The environment a node's container gets, with its config file written under tmp;
    `nats`/`listen` rewrite the file for loopback and data_dir moves under tmp."""
    pod = f"{facts['sts']['metadata']['name']}-{pod_index}"
    text = facts["toml"]
    data_dir = tmp / f"data-{pod_index}"
    text = re.sub(r'^data_dir\s*=.*$', f'data_dir = "{data_dir}"', text, flags=re.M)
    if nats is not None:
        text = re.sub(r'^nats\s*=.*$', f'nats = "{nats}"', text, flags=re.M)
    if listen is not None:
        text = re.sub(r'^listen\s*=.*$', f'listen = "{listen}"', text, flags=re.M)
    if http_listen is not None:
        text = re.sub(r'^http_listen\s*=.*$', f'http_listen = "{http_listen}"', text, flags=re.M)
    # TLS files come from Secrets the pod mounts: throwaway ones stand in for them here.
    text = re.sub(r'^(tls_cert|tls_key|tls_client_ca)\s*=.*$',
                  lambda m: f'{m.group(1)} = "{test_tls_files(tmp)[TLS_KEYS[m.group(1)]]}"', text, flags=re.M)
    config = tmp / f"dropline-{pod_index}.toml"
    config.write_text(text)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
    for e in facts["container"].get("env", []):
        if e["name"] in TLS_ENV:
            env[e["name"]] = str(test_tls_files(tmp)[TLS_ENV[e["name"]]])
        elif "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = "rehearsal-operator-credential-0123456789"
    env["DROPLINE_CONFIG"] = str(config)
    return env, config


TLS_KEYS = {"tls_cert": "cert", "tls_key": "key", "tls_client_ca": "ca"}
TLS_ENV = {"DROPLINE_TLS_CERT": "cert", "DROPLINE_TLS_KEY": "key", "DROPLINE_TLS_CLIENT_CA": "ca"}


def test_tls_files(tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    """A self-signed certificate and its key under tmp/tls (made once), which also serves as
    the client CA: what `--check-config` reads in place of the pod's Secrets."""
    d = tmp / "tls"
    files = {"cert": d / "tls.crt", "key": d / "tls.key", "ca": d / "tls.crt"}
    if not files["cert"].exists():
        d.mkdir(exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(files["key"]), "-out", str(files["cert"]), "-days", "1",
                        "-subj", "/CN=dropline", "-addext", "subjectAltName=DNS:localhost"],
                       check=True, capture_output=True)
    return files


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------


def check_dockerfile(dropline: pathlib.Path) -> set[str]:
    section("Dockerfile")
    cmds = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    stages: list[list] = []
    for cmd in cmds:
        if cmd.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(cmd)
    C.ok(len(stages) >= 2, "multi-stage: a build stage and a runtime stage")
    build, runtime = stages[0], stages[-1]
    runs = " ".join(" ".join(c.value) for c in build if c.cmd == "RUN")
    C.ok("cargo build --release --locked" in runs and "--bin dropline" in runs, "the build stage builds `dropline` --release --locked")
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    C.ok(bool(users) and users[-1].split(":")[0] not in ("root", "0"), f"the runtime stage runs as a non-root user ({users})")
    C.ok(not any(c.cmd == "RUN" for c in runtime), "the runtime stage installs nothing (no RUN)")
    entry = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    C.ok(bool(entry) and entry[-1].json and entry[-1].value[0] == "/usr/local/bin/dropline", "ENTRYPOINT is the dropline binary (exec form)")
    copied = [c for c in runtime if c.cmd == "COPY" and any(f.startswith("--from=") for f in c.flags)]
    C.ok(any("/usr/local/bin/dropline" in c.value for c in copied), "the binary is copied from the build stage")
    exposed = {v for c in runtime if c.cmd == "EXPOSE" for v in c.value}
    C.ok("50051" in exposed, "EXPOSE 50051 (the manifests' gRPC port)")
    C.ok("8080" in exposed, "EXPOSE 8080 (the manifests' HTTP port: /metrics, /readyz)")
    health = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    C.ok(bool(health) and "health" in " ".join(health[-1].value), "HEALTHCHECK asks `dropline health`")
    ignore = (ROOT / ".dockerignore").read_text().split()
    C.ok("target/" in ignore and ".tools/" in ignore, ".dockerignore keeps target/ and .tools/ out of the context")
    # ENV values come as alternating names and values.
    env = {}
    for c in runtime:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2]))
    settings = {k for k in env if k.startswith("DROPLINE_")}
    C.ok(settings == {"DROPLINE_CONFIG"},
         f"the image's environment names only the config file ({sorted(settings)}): a setting there would beat the mounted TOML")
    config_path = env.get("DROPLINE_CONFIG", "")
    shipped = [c.value[0] for c in runtime if c.cmd == "COPY" and not c.flags and len(c.value) == 2 and c.value[1] == config_path]
    C.ok(len(shipped) == 1, f"the image ships its default config at DROPLINE_CONFIG ({config_path})")
    if shipped:
        run = subprocess.run([str(dropline), "serve", "--check-config"], capture_output=True, text=True,
                             env={"PATH": os.environ.get("PATH", ""), "DROPLINE_CONFIG": str(ROOT / shipped[0])})
        volumes = {v for c in runtime if c.cmd == "VOLUME" for v in c.value}
        C.ok(run.returncode == 0 and 'listen = "0.0.0.0:50051"' in run.stdout
             and 'http_listen = "0.0.0.0:8080"' in run.stdout
             and any(f'data_dir = "{v}"' in run.stdout for v in volumes),
             f"{shipped[0]}: --check-config accepts it; it listens on all interfaces on the exposed port, data on the volume "
             f"({(run.stdout + run.stderr).strip()[-200:]})")
    return settings


def kustomize(path: pathlib.Path) -> list[dict]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        C.ok(False, f"kubectl kustomize {path.relative_to(ROOT)}: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def check_kustomize(dropline: pathlib.Path) -> tuple[list[list[dict]], dict]:
    section("k8s/ (kubectl kustomize, Kubernetes schemas, semantics)")
    rendered, base_facts = [], None
    for rel in ["k8s/base", "k8s/overlays/dev", "k8s/overlays/production", "k8s/overlays/production-tls"]:
        docs = kustomize(ROOT / rel)
        if not C.ok(bool(docs), f"{rel}: renders"):
            continue
        print(f"  {rel}: {len(docs)} objects: " + ", ".join(sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)))
        validate_schemas(docs, rel)
        # base and production expect the operator to create the credential's Secret.
        external = set() if rel.endswith("dev") else {"dropline-operator"}
        facts = check_objects(docs, rel, external)
        check_nats(docs, rel, facts)
        check_config_with_binary(dropline, facts, rel)
        if rel.endswith("dev"):
            C.ok(any(d["kind"] == "Secret" for d in docs), f"{rel}: generates its dev-only credential")
            C.ok(dropline_statefulset(docs)["spec"]["replicas"] < 3, f"{rel}: a smaller cluster")
        if "production" in rel:
            tsc = dropline_statefulset(docs)["spec"]["template"]["spec"]["topologySpreadConstraints"]
            C.ok(any(t["whenUnsatisfiable"] == "DoNotSchedule" and t["topologyKey"] == "kubernetes.io/hostname" for t in tsc),
                 f"{rel}: nodes spread evenly over machines (required)")
            C.ok(not any(d["kind"] == "Secret" for d in docs), f"{rel}: no credential in the manifests")
        if rel.endswith("production-tls"):
            env = {e["name"] for e in facts["container"].get("env", [])}
            C.ok({"DROPLINE_TLS_CERT", "DROPLINE_TLS_KEY", "DROPLINE_TLS_CLIENT_CA"} <= env,
                 f"{rel}: serves over TLS and accepts partners' client certificates")
        if rel == "k8s/base":
            base_facts = facts
        rendered.append(docs)
    return rendered, base_facts


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


BAD_VALUES = [
    ("no nodes", {"replicaCount": 0}),
    ("replicas as a string", {"replicaCount": "3"}),
    ("an unknown key (a typo)", {"replicas": 3}),
    ("no partitions", {"cluster": {"partitions": 0}}),
    ("an even journal replica count", {"cluster": {"journalReplicas": 2}}),
    ("lease TTL under 3 renewals", {"cluster": {"leaseTtlMs": 2000, "leaseRenewMs": 1000}}),
    ("a short operator credential", {"operatorToken": {"value": "short"}}),
    ("an unknown pull policy", {"image": {"pullPolicy": "Sometimes"}}),
    ("a digest that is not sha256", {"image": {"digest": "md5:abc"}}),
    ("storage in GB instead of Gi", {"persistence": {"size": "10GB"}}),
    ("a grace period shorter than the drain", {"terminationGracePeriodSeconds": 15}),
    ("no NATS at all", {"nats": {"enabled": False}}),
    ("both bundled and external NATS", {"externalNats": {"urls": ["nats://a:4222"]}}),
    ("an external NATS URL that is not nats://", {"nats": {"enabled": False}, "externalNats": {"urls": ["http://a:4222"]}}),
    ("more journal replicas than NATS servers", {"cluster": {"journalReplicas": 5}}),
    ("JetStream switched off", {"nats": {"config": {"jetstream": {"enabled": False}}}}),
    ("a service port out of range", {"service": {"port": 70000}}),
    ("bundled NATS not clustered", {"nats": {"config": {"cluster": {"enabled": False}}}}),
    ("a single NATS server", {"nats": {"config": {"cluster": {"replicas": 1}}}, "cluster": {"journalReplicas": 1}}),
    ("memory in millibytes (512m)", {"resources": {"limits": {"memory": "512m"}}}),
    ("cpu with a memory suffix", {"resources": {"requests": {"cpu": "2Gi"}}}),
    ("TLS without its Secret", {"tls": {"enabled": True}}),
    ("client certificates without TLS", {"tls": {"clientCaSecretName": "partners-ca"}}),
    ("a Secret name with capitals", {"tls": {"enabled": True, "secretName": "Dropline-TLS"}}),
    ("a console origin with a path", {"http": {"consoleOrigin": "https://drops.example.com/ops"}}),
    ("an OTLP endpoint without a scheme", {"otlpEndpoint": "otel-collector:4317"}),
]


def check_helm(dropline: pathlib.Path) -> list[list[dict]]:
    section("helm/dropline (Helm 4 lint, values.schema.json, render, Kubernetes schemas)")
    print(f"  Helm SDK {helm.helm_sdk_version()} through helm-c {helm.helm_c_version()}")
    lint = helm.lint(str(CHART))
    for m in lint["messages"]:
        print(f"  lint [{['', 'info', 'warning', 'error'][m['severity']] if m['severity'] < 4 else m['severity']}] {m['path']}: {m['error']}")
    C.ok(not lint["errors"] and all(m["severity"] < 3 for m in lint["messages"]), "helm lint: no errors")
    unexpected = [m for m in lint["messages"] if m["severity"] >= 2 and "missing these dependencies: nats" not in m["error"]]
    C.ok(not unexpected, f"helm lint: no warnings but the NATS dependency, which is fetched at install ({unexpected})")

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    cases = [("default values", {})] + [
        (f"examples/{p.name}", yaml.safe_load(p.read_text())) for p in sorted((CHART / "examples").glob("*.yaml"))]
    rendered = []
    with helm.Chart.load(str(CHART)) as chart:
        for label, values in cases:
            merged = deep_merge(defaults, values)
            errors = sorted(e.message for e in jsonschema.Draft7Validator(schema).iter_errors(merged))
            C.ok(not errors, f"{label}: valid against values.schema.json (jsonschema) {errors}")
            try:
                chart.validate_schema(values)
                C.ok(True, f"{label}: valid against values.schema.json (Helm)")
                manifests = chart.render(values, name="dropline", namespace="dropline")
            except helm.HelmError as e:
                C.ok(False, f"{label}: Helm refused the values: {e}")
                continue
            docs = [d for name, text in manifests.items() if name.endswith(".yaml") and "/tests/" not in name
                    for d in yaml.safe_load_all(text) if d]
            tests = [d for name, text in manifests.items() if "/tests/" in name for d in yaml.safe_load_all(text) if d]
            print(f"  {label}: {len(docs)} objects: " + ", ".join(sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)))
            validate_schemas(docs + tests, f"helm {label}")
            existing = merged["operatorToken"]["existingSecret"]
            facts = check_objects(docs, f"helm {label}", {existing} if existing else set())
            selector = facts["sts"]["spec"]["selector"]["matchLabels"]
            C.ok(bool(tests) and not any(all(t["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())
                                         for t in tests),
                 f"helm {label}: the `helm test` pod is not selected as a node (Services, PDB, spread)")
            C.ok(bool(existing) != any(d["kind"] == "Secret" for d in docs),
                 f"helm {label}: the chart makes the credential's Secret exactly when none is named")
            if not merged["nats"]["enabled"]:
                want = ",".join(merged["externalNats"]["urls"])
                C.ok(facts["settings"].get("nats") == want, f"helm {label}: Dropline uses the external NATS URLs")
            else:
                n = merged["nats"]["config"]["cluster"]["replicas"]
                hosts = facts["settings"].get("nats", "").split(",")
                C.ok(len(hosts) == n and all(re.match(r"^nats://dropline-nats-\d\.dropline-nats-headless:4222$", h) for h in hosts),
                     f"helm {label}: Dropline lists the bundled NATS chart's {n} servers by their stable names")
            check_service_monitor(docs, merged, f"helm {label}")
            C.ok(not merged["nats"]["enabled"] or merged["nats"].get("promExporter", {}).get("enabled") is True,
                 f"helm {label}: the bundled NATS chart runs its Prometheus exporter")
            if merged["tls"]["enabled"]:
                settings = facts["settings"]
                volumes = {v["name"]: v for v in facts["sts"]["spec"]["template"]["spec"]["volumes"]}
                C.ok(settings.get("tls_cert", "").startswith("/etc/dropline-tls/")
                     and volumes.get("tls", {}).get("secret", {}).get("secretName") == merged["tls"]["secretName"],
                     f"helm {label}: serves over TLS with the certificate from Secret {merged['tls']['secretName']}")
                C.ok(bool(settings.get("tls_client_ca")) == bool(merged["tls"]["clientCaSecretName"]),
                     f"helm {label}: asks for client certificates exactly when a client CA is named")
            check_config_with_binary(dropline, facts, f"helm {label}")
            rendered.append(docs)
        for label, values in BAD_VALUES:
            try:
                chart.validate_schema(values)
                chart.render(values, name="dropline", namespace="dropline")
                C.ok(False, f"bad values refused: {label} ({values}) was accepted")
            except helm.HelmError as e:
                reason = str(e).replace("\n", " ")
                C.ok(True, f"bad values refused: {label}")
                print(f"  refused, as it should be: {label}: {reason[:150]}")
    return rendered


def check_service_monitor(docs: list[dict], values: dict, label: str) -> None:
    """A ServiceMonitor exactly when asked for, scraping /metrics on the http port of one
    Service of the nodes (each node once)."""
    monitors = by_kind(docs, "ServiceMonitor")
    wanted = values["metrics"]["serviceMonitor"]["enabled"]
    if not C.ok(len(monitors) == (1 if wanted else 0), f"{label}: a ServiceMonitor exactly when metrics.serviceMonitor.enabled"):
        return
    for sm in monitors:
        C.ok(sm["apiVersion"] == "monitoring.coreos.com/v1", f"{label}: ServiceMonitor is monitoring.coreos.com/v1")
        selected = [svc for svc in by_kind(docs, "Service")
                    if selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"].get("labels", {}))]
        if not C.ok(len(selected) == 1, f"{label}: the ServiceMonitor selects one Service (each node scraped once)"):
            continue
        ports = {p["name"] for p in selected[0]["spec"]["ports"]}
        for e in sm["spec"]["endpoints"]:
            C.ok(e["port"] in ports and e.get("path") == "/metrics",
                 f"{label}: the ServiceMonitor scrapes /metrics on Service {selected[0]['metadata']['name']}'s port {e['port']}")
        for k, v in values["metrics"]["serviceMonitor"].get("labels", {}).items():
            C.ok(sm["metadata"]["labels"].get(k) == v, f"{label}: the ServiceMonitor carries the label {k}={v}")


def check_names(dropline: pathlib.Path, rendered: list[list[dict]], dockerfile_env: set[str]) -> None:
    section("flags and environment variables exist in `dropline serve --help`")
    helps = {}
    for sub in ("serve", "health"):
        helps[sub] = subprocess.run([str(dropline), sub, "--help"], capture_output=True, text=True, check=True).stdout
    known_env = set(re.findall(r"\[env: (\w+)", "".join(helps.values())))
    known_flags = {sub: set(re.findall(r"--[a-z][a-z0-9-]*", text)) for sub, text in helps.items()}
    used_env, used_args = set(dockerfile_env), []
    for docs in rendered:
        for d in docs:
            pod = d.get("spec", {}).get("template", {}).get("spec") or (d.get("spec") if d["kind"] == "Pod" else None)
            if not pod:
                continue
            for c in pod.get("containers", []):
                if "dropline" not in c.get("image", ""):
                    continue
                used_env |= {e["name"] for e in c.get("env", []) if e["name"].startswith("DROPLINE_")}
                used_args.append(c.get("args", []))
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    command = c.get(probe, {}).get("exec", {}).get("command", [])
                    if command and command[0].endswith("/dropline"):
                        used_args.append(command[1:])
    for name in sorted(used_env):
        C.ok(name in known_env, f"{name} is a `dropline serve` environment variable")
    for args in used_args:
        sub = args[0] if args else "serve"
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            C.ok(flag in known_flags.get(sub, set()), f"`dropline {sub}` has the flag {flag}")
    # The TOML keys are checked by the binary itself (--check-config refuses unknown keys).


# ---------------------------------------------------------------------------------------------
# Rehearsal of the pod lifecycle on loopback
# ---------------------------------------------------------------------------------------------


_port_cursor: list[int] = []


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range and never handed out twice
    (as testkit::nats::unused_loopback_port: a port from bind(:0) can be taken by one of the outgoing
    NATS connections of the starting cluster before its server binds it)."""
    try:
        first, last = (int(n) for n in pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        first, last = 32768, 60999
    low, high = (10000, first - 1) if first >= 12000 else ((last + 1, 65535) if last <= 63000 else (10000, 65535))
    span = high - low + 1
    if not _port_cursor:
        _port_cursor.append(random.randrange(span))
    for _ in range(span):
        port = low + _port_cursor[0] % span
        _port_cursor[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free loopback port in {low}..{high}")


def health(dropline: pathlib.Path, port: int, service: str) -> str:
    run = subprocess.run([str(dropline), "health", "--server", f"http://127.0.0.1:{port}", "--service", service,
                          "--timeout-ms", "1000"], capture_output=True, text=True)
    return run.stdout.strip() or "UNREACHABLE"


def wait_for(what: str, predicate, timeout: float, proc: subprocess.Popen | None = None) -> float | None:
    """Seconds until `predicate` holds, or None after `timeout` (at once if `proc` exits)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            print(f"  {what}: the process exited with status {proc.returncode}")
            return None
        time.sleep(0.2)
    return None


def wait_steady(predicate, hold: float, timeout: float) -> float | None:
    """Seconds until `predicate` has held without a break for `hold` seconds, or None."""
    start = time.monotonic()
    since = None
    while time.monotonic() - start < timeout:
        if predicate():
            since = since if since is not None else time.monotonic()
            if time.monotonic() - since >= hold:
                return time.monotonic() - start
        else:
            since = None
        time.sleep(0.2)
    return None


class NatsCluster:
    """The rendered nats.conf, rewritten only where loopback needs it (ports, routes, paths)."""

    def __init__(self, conf: str, sts: dict, tmp: pathlib.Path) -> None:
        self.n = sts["spec"]["replicas"]
        self.name, headless = sts["metadata"]["name"], sts["spec"]["serviceName"]
        self.ports = [(free_port(), free_port(), free_port()) for _ in range(self.n)]
        self.tmp, self.procs, self.confs = tmp, [None] * self.n, []
        for i in range(self.n):
            client, route, monitor = self.ports[i]
            text = conf.replace("0.0.0.0:4222", f"127.0.0.1:{client}").replace("0.0.0.0:6222", f"127.0.0.1:{route}")
            text = text.replace("0.0.0.0:8222", f"127.0.0.1:{monitor}")
            for j in range(self.n):
                text = text.replace(f"nats://{self.name}-{j}.{headless}:6222", f"nats://127.0.0.1:{self.ports[j][1]}")
            text = re.sub(r"(store_dir:\s*)\S+", rf"\g<1>{tmp}/js-{i}", text)
            text = re.sub(r"(pid_file:\s*)\S+", rf"\g<1>{tmp}/nats-{i}.pid", text)
            path = tmp / f"nats-{i}.conf"
            path.write_text(text)
            self.confs.append(path)

    def urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{c}" for c, _, _ in self.ports)

    def start(self) -> None:
        for i, path in enumerate(self.confs):
            log = open(self.tmp / f"nats-{i}.log", "ab")
            self.procs[i] = subprocess.Popen([str(NATS_SERVER), "-c", str(path)], stdout=log, stderr=log,
                                             env={**os.environ, "POD_NAME": f"{self.name}-{i}"})

    def ready(self) -> bool:
        for _, _, monitor in self.ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", timeout=1) as r:
                    if r.status != 200:
                        return False
            except OSError:
                return False
        return True

    def stop(self) -> None:
        for p in self.procs:
            if p and p.poll() is None:
                p.terminate()
        for p in self.procs:
            if p:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()


def rehearse(dropline: pathlib.Path, docs: list[dict], facts: dict) -> None:
    section("rehearsal: 3 NATS servers and 2 Dropline nodes from the rendered k8s/base objects, on loopback")
    conf, nats_sts = nats_conf(docs)
    grace = facts["sts"]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    startup = facts["container"]["startupProbe"]
    startup_budget = startup["periodSeconds"] * startup["failureThreshold"]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dropline-rehearsal-"))
    nats = NatsCluster(conf, nats_sts, tmp)
    nodes: list[subprocess.Popen] = []
    ports: list[int] = []
    try:
        nats.start()
        took = wait_for("NATS", nats.ready, 60)
        if not C.ok(took is not None, "the 3 NATS servers (rendered nats.conf) form a JetStream cluster"):
            return
        print(f"  NATS JetStream cluster up in {took:.1f} s")
        http_ports = [free_port() for _ in range(2)]
        for i in range(2):
            port = free_port()
            env, _ = pod_env(facts, tmp, nats=nats.urls(), pod_index=i, listen=f"127.0.0.1:{port}",
                             http_listen=f"127.0.0.1:{http_ports[i]}")
            log = open(tmp / f"dropline-{i}.log", "ab")
            nodes.append(subprocess.Popen([str(dropline), *facts["container"].get("args", [])], stdout=log, stderr=log, env=env))
            ports.append(port)
        for i, port in enumerate(ports):
            took = wait_for("startup", lambda: health(dropline, port, "liveness") == "SERVING", startup_budget,
                            nodes[i])
            C.ok(took is not None, f"node {i}: the startup probe (liveness) passes within its {startup_budget} s budget")
            if took is not None:
                print(f"  node {i}: live after {took:.1f} s")
            C.ok(wait_for("ready", lambda: health(dropline, port, "") == "SERVING", 30) is not None,
                 f"node {i}: the readiness probe passes")
        # An authenticated call through the cluster, with the credential the pod gets from its Secret.
        token = pod_env(facts, tmp, nats=None)[0].get("DROPLINE_OPERATOR_TOKEN", "")
        run = subprocess.run([str(dropline), "settlement", "--server", f"http://127.0.0.1:{ports[1]}", "--token", token,
                              "reconcile", "--dry-run"], capture_output=True, text=True, timeout=60)
        C.ok(run.returncode == 0, f"an operator call (reconcile --dry-run) succeeds on node 1 ({(run.stdout + run.stderr).strip()[-200:]})")
        # The HTTP side, as Prometheus and an HTTP probe would see it.
        for i, http_port in enumerate(http_ports):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as r:
                    C.ok(r.status == 200, f"node {i}: /readyz answers 200 while ready")
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
                    text = r.read().decode()
                C.ok("dropline_cluster_partitions_owned" in text and "dropline_journal_queue_depth{journal=\"jetstream\"}" in text,
                     f"node {i}: /metrics has the cluster's and JetStream journal's figures")
            except OSError as e:
                C.ok(False, f"node {i}: the HTTP side answers ({e})")

        # NATS lost: readiness goes NOT_SERVING (the Service stops sending calls), liveness stays.
        nats.stop()
        took = wait_for("not ready", lambda: health(dropline, ports[0], "") == "NOT_SERVING", 15)
        C.ok(took is not None, "without NATS a node reports NOT_SERVING to readiness")
        C.ok(health(dropline, ports[0], "liveness") == "SERVING", "without NATS a node stays live (no restart loop)")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_ports[0]}/readyz", timeout=5)
            C.ok(False, "without NATS /readyz answers 503 (it answered 200)")
        except urllib.error.HTTPError as e:
            C.ok(e.code == 503, f"without NATS /readyz answers 503, as gRPC readiness ({e.code})")
        except OSError as e:
            C.ok(False, f"without NATS /readyz answers 503 ({e})")
        if took is not None:
            print(f"  NATS stopped: node 0 not ready after {took:.1f} s, still live")
        nats.start()
        # Ready once its connection is back and its heartbeat is written again, which waits
        # for JetStream's leaders after a restart of every server: steadily, over two lease TTLs.
        took = wait_steady(lambda: health(dropline, ports[0], "") == "SERVING", 10, 90)
        C.ok(took is not None, "with NATS back the node is ready again")
        if took is not None:
            print(f"  NATS back: node 0 ready again after {took:.1f} s")

        # SIGTERM: NOT_SERVING at once, still live and answering while the delay runs, then exit.
        stop_at = time.monotonic()
        nodes[1].send_signal(signal.SIGTERM)
        took = wait_for("not ready", lambda: health(dropline, ports[1], "") == "NOT_SERVING", 2)
        C.ok(took is not None, "SIGTERM: readiness NOT_SERVING at once")
        C.ok(health(dropline, ports[1], "liveness") == "SERVING", "SIGTERM: liveness still SERVING while the node drains")
        try:
            nodes[1].wait(timeout=grace)
            exited = time.monotonic() - stop_at
            C.ok(nodes[1].returncode == 0, f"SIGTERM: the node exits cleanly (status {nodes[1].returncode})")
            C.ok(True, f"SIGTERM: the node exits within the grace period ({exited:.1f} s of {grace} s)")
            print(f"  SIGTERM: node 1 exited after {exited:.1f} s (grace period {grace} s)")
        except subprocess.TimeoutExpired:
            C.ok(False, f"SIGTERM: the node did not exit within the grace period ({grace} s)")
        C.ok(health(dropline, ports[0], "") == "SERVING", "the other node stays ready")
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
        nats.stop()
        if C.failures:
            print(f"  logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dropline", default=str(ROOT / "target" / "debug" / "dropline"))
    parser.add_argument("--skip-rehearsal", action="store_true")
    args = parser.parse_args()
    dropline = pathlib.Path(args.dropline)
    for tool in (dropline, KUBECTL, NATS_SERVER):
        if not tool.exists():
            print(f"missing {tool}: run scripts/test.sh (it builds dropline and installs the tools)", file=sys.stderr)
            return 2
    env_in_dockerfile = check_dockerfile(dropline)
    kustomized, base_facts = check_kustomize(dropline)
    charted = check_helm(dropline)
    check_names(dropline, kustomized + charted, env_in_dockerfile)
    if not args.skip_rehearsal and kustomized and base_facts:
        rehearse(dropline, kustomized[0], base_facts)
    print(f"\ndeploy checks: {C.passed} passed, {len(C.failures)} failed")
    for f in C.failures:
        print(f"  FAILED: {f}")
    return 1 if C.failures else 0


if __name__ == "__main__":
    sys.exit(main())
