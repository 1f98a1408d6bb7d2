"""deploy/ against the code it deploys: the Kubernetes manifests and the Dockerfile.

Nothing here runs a container. Each check reads the files as data and holds them against the real
thing: container args parse with the real `timetravel` parser (so a renamed or removed flag
fails here), env names are the documented constants, ports and probes match the servers'
`--port`, the services file loads with `snapshotter.load_services`, the tokens files parse with
the servers' own parser, and grace periods cover the servers' shutdown timeouts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

import snapshotter
import ttstore
from factlog._server import IngestConfig
from snapshotter._run import parse_shard
from ttstore._cli import build_parser
from ttstore._http import DEFAULT_SHUTDOWN_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"

#: Files in deploy/k8s that are deliberately not in kustomization.yaml: placeholders that would
#: overwrite real Secrets, and a one-off Job.
NOT_APPLIED = {"secrets.example.yaml", "select-job.yaml"}
#: The documented environment variables of the project (ttstore's constants, defined once).
TIMETRAVEL_ENV = {ttstore.ENV_STORE, ttstore.ENV_REPO, ttstore.ENV_TOKENS_FILE}
#: Standard AWS SDK variables (credentials, region, workload identity); the endpoint is ttstore's.
AWS_ENV = {
    ttstore.ENV_AWS_ENDPOINT_URL, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
}
#: Set by the Job controller in the pods of an Indexed Job.
INDEX_ENV = "JOB_COMPLETION_INDEX"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
SERVERS = {("facts", "serve"), ("api", "serve")}
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# -- reading the files -----------------------------------------------------------------------------
@cache
def _docs() -> tuple[tuple[str, dict[str, Any]], ...]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                out.append((path.name, doc))
    return tuple(out)


def _objects(kind: str | None = None) -> list[dict[str, Any]]:
    return [d for f, d in _docs() if f != "kustomization.yaml" and (kind is None
                                                                    or d["kind"] == kind)]


def _named(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _objects(kind) if o["metadata"].get("name") == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} definitions in deploy/k8s"
    return found[0]


def _secret_data(name: str) -> dict[str, str]:
    return dict(_named("Secret", name).get("stringData") or {})


def _configmap_data(name: str) -> dict[str, str]:
    return dict(_named("ConfigMap", name).get("data") or {})


@dataclass(frozen=True)
class Container:
    """One container of a workload, with what its pods are given."""

    workload: dict[str, Any]
    pod_meta: dict[str, Any]
    pod: dict[str, Any]
    spec: dict[str, Any]

    @property
    def where(self) -> str:
        meta = self.workload["metadata"]
        return f"{self.workload['kind']}/{meta.get('name') or meta.get('generateName')}"

    @property
    def job_spec(self) -> dict[str, Any] | None:
        if self.workload["kind"] == "CronJob":
            return dict(self.workload["spec"]["jobTemplate"]["spec"])
        if self.workload["kind"] == "Job":
            return dict(self.workload["spec"])
        return None

    def argv(self) -> list[str]:
        """The `timetravel` arguments: command (or the image's ENTRYPOINT), then args."""
        command = list(self.spec.get("command") or _dockerfile().entrypoint)
        assert command and Path(command[0]).name == "timetravel", (
            f"{self.where}: runs {command}, not timetravel")
        return [*command[1:], *map(str, self.spec.get("args") or [])]

    def role(self) -> tuple[str, str]:
        a = self.argv()
        return a[0], a[1]

    def env(self, *, index: int = 0) -> dict[str, str]:
        """The environment the container gets, with sample values for secrets and the index."""
        out: dict[str, str] = {}
        for src in self.spec.get("envFrom") or []:
            if "configMapRef" in src:
                out.update(_configmap_data(src["configMapRef"]["name"]))
            elif "secretRef" in src:
                out.update(_secret_data(src["secretRef"]["name"]))
        for var in self.spec.get("env") or []:
            if "value" in var:
                out[var["name"]] = str(var["value"])
            elif var["name"] == INDEX_ENV:
                out[var["name"]] = str(index)
            else:
                out[var["name"]] = f"sample-{var['name'].lower()}"
        return out

    def expanded_argv(self, *, index: int = 0) -> list[str]:
        """argv with the kubelet's $(VAR) expansion from the container's env."""
        env = self.env(index=index)

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            # Kubernetes leaves an undefined $(VAR) as is: the command would get it literally.
            assert name in env, f"{self.where}: $({name}) in args is not in the container's env"
            return env[name]

        return [_VAR_REF.sub(sub, a) for a in self.argv()]

    def mount_source(self, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The volumeMount covering ``path`` and its volume (pod volume or claim template)."""
        mounts = [m for m in self.spec.get("volumeMounts") or []
                  if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"{self.where}: nothing is mounted at {path}"
        mount = max(mounts, key=lambda m: len(m["mountPath"]))
        volumes = {v["name"]: v for v in self.pod.get("volumes") or []}
        claims = {c["metadata"]["name"]: {"name": c["metadata"]["name"], "claimTemplate": c}
                  for c in self.workload["spec"].get("volumeClaimTemplates") or []}
        assert not (volumes.keys() & claims.keys()), f"{self.where}: a volume is defined twice"
        source = {**volumes, **claims}.get(mount["name"])
        assert source is not None, f"{self.where}: mount {mount['name']} has no volume"
        return mount, source

    def mounted_file(self, path: str) -> tuple[str, str, str]:
        """(kind, object name, key) of the Secret or ConfigMap key mounted as file ``path``."""
        mount, volume = self.mount_source(path)
        rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
        for kind, field, name_field in (("Secret", "secret", "secretName"),
                                        ("ConfigMap", "configMap", "name")):
            if field in volume:
                src = volume[field]
                items = src.get("items")
                key = (next((i["key"] for i in items if i["path"] == rel), None) if items
                       else rel)
                assert key is not None, f"{self.where}: {path} is not among the mounted items"
                return kind, src[name_field], key
        raise AssertionError(f"{self.where}: {path} is not a Secret or ConfigMap file")


def _pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return dict(obj["spec"]["template"])
    if kind == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"])
    return None


def _containers() -> list[Container]:
    out = []
    for obj in _objects():
        tpl = _pod_template(obj)
        if tpl is None:
            continue
        for c in tpl["spec"]["containers"]:
            out.append(Container(obj, tpl.get("metadata") or {}, tpl["spec"], c))
    return out


def _by_role(role: tuple[str, str]) -> list[Container]:
    return [c for c in _containers() if c.role() == role]


def _parse(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture[str]) -> argparse.Namespace:
    """``argv`` through the real dispatcher's parser (built as `run()` builds it), in ``env``:
    option defaults such as ``--store`` read the environment when the parser is built."""
    for k in list(os.environ):
        if k.startswith("TIMETRAVEL_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    parser = build_parser()  # full option names only, so a renamed flag cannot parse as a prefix
    try:
        ns = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"timetravel {shlex.join(argv)} does not parse: {capsys.readouterr().err}")
    assert getattr(ns, "handler", None) is not None, argv
    return ns


def _parsed(c: Container, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> argparse.Namespace:
    return _parse(c.expanded_argv(), c.env(), monkeypatch, capsys)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _port_number(port: Any, c: Container) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.spec.get("ports") or [] if p.get("name") == port]
    assert len(named) == 1, f"{c.where}: no single container port named {port!r}"
    return int(named[0])


def _pre_stop_s(c: Container) -> float:
    cmd = (((c.spec.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get(
        "command") or []
    return float(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else 0.0


def _cpu(q: str | int | float) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _bytes(q: str | int) -> int:
    s = str(q)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9}
    for suffix, mult in units.items():
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    return int(s)


def _services_toml_vars(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))


@dataclass(frozen=True)
class Dockerfile:
    stages: list[list[tuple[str, str]]]  # per FROM: (INSTRUCTION, rest)

    @property
    def final(self) -> list[tuple[str, str]]:
        return self.stages[-1]

    @property
    def entrypoint(self) -> list[str]:
        values = [rest for ins, rest in self.final if ins == "ENTRYPOINT"]
        assert values, "deploy/Dockerfile: no ENTRYPOINT in the final stage"
        value = json.loads(values[-1])  # exec form, so SIGTERM reaches timetravel (no sh -c)
        assert isinstance(value, list), "deploy/Dockerfile: ENTRYPOINT is not in exec form"
        return [str(v) for v in value]


@cache
def _dockerfile() -> Dockerfile:
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical: list[str] = []
    buf = ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        ins, _, rest = line.strip().partition(" ")
        if ins.upper() == "FROM":
            stages.append([])
        assert stages, f"deploy/Dockerfile: {ins} before FROM"
        stages[-1].append((ins.upper(), rest.strip()))
    return Dockerfile(stages)


# -- the files -------------------------------------------------------------------------------------
def test_every_manifest_parses_and_is_namespace_agnostic() -> None:
    files = {p.name for p in K8S.glob("*.yaml")}
    assert {"ingest.yaml", "api.yaml", "snapshot.yaml", "compaction.yaml", "config.yaml",
            "secrets.example.yaml", "kustomization.yaml"} <= files
    assert not list(K8S.glob("*.yml")), "use .yaml: the tests and kustomization read *.yaml"
    for name, doc in _docs():
        assert isinstance(doc, dict), name
        assert doc.get("apiVersion") and doc.get("kind"), name
        if name == "kustomization.yaml":
            continue
        meta = doc["metadata"]
        assert meta.get("name") or meta.get("generateName"), name
        assert "namespace" not in meta, f"{name}: {doc['kind']} pins a namespace"


def test_kustomization_applies_every_standing_manifest_and_renames_the_image() -> None:
    kust = next(d for f, d in _docs() if f == "kustomization.yaml")
    assert "namespace" not in kust
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files - NOT_APPLIED
    assert NOT_APPLIED <= files
    # The `images` rewrite only applies to containers whose image name matches it exactly.
    images = {c.spec["image"].rsplit(":", 1)[0] for c in _containers()}
    assert images == {i["name"] for i in kust["images"]}


def test_every_container_command_parses_with_the_real_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _configmap_data("timetravel-env")[ttstore.ENV_STORE]
    roles = set()
    containers = _containers()
    assert containers
    for c in containers:
        job = c.job_spec or {}
        indexes = range(int(job.get("completions", 1))) if job.get(
            "completionMode") == "Indexed" else range(1)
        for i in indexes:
            ns = _parse(c.expanded_argv(index=i), c.env(index=i), monkeypatch, capsys)
            # The store comes from the ConfigMap through ENV_STORE, as the CLI reads it.
            assert ns.store == store, c.where
            assert ns.repo is None or ns.repo == c.env().get(ttstore.ENV_REPO), c.where
        roles.add(c.role())
    assert roles >= {("facts", "serve"), ("api", "serve"), ("snapshot", "run"),
                     ("facts", "compact")}


def test_a_flag_the_cli_does_not_have_fails_to_parse(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The parse check above is only worth something if a drifted flag fails it.
    c = _by_role(("facts", "serve"))[0]
    argv = [a.replace("--spool-dir", "--spool-path") for a in c.expanded_argv()]
    with pytest.raises(pytest.fail.Exception, match="--spool-path"):
        _parse(argv, c.env(), monkeypatch, capsys)


def test_an_abbreviated_flag_fails_to_parse(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    c = _by_role(("api", "serve"))[0]
    argv = c.expanded_argv()
    assert "--workers" in argv
    argv = [a.replace("--workers", "--worker") for a in argv]
    with pytest.raises(pytest.fail.Exception, match="--worker"):
        _parse(argv, c.env(), monkeypatch, capsys)


def test_env_names_are_the_documented_ones() -> None:
    services_vars = _services_toml_vars(_configmap_data("timetravel-services")["services.toml"])
    assert ttstore.ENV_STORE in _configmap_data("timetravel-env")
    assert ttstore.ENV_AWS_ENDPOINT_URL in _configmap_data("timetravel-env")
    for c in _containers():
        names = set(c.env())
        assert ttstore.ENV_STORE in names, f"{c.where}: no {ttstore.ENV_STORE}"
        for n in names:
            if n.startswith("TIMETRAVEL_"):
                assert n in TIMETRAVEL_ENV, f"{c.where}: {n} is not a ttstore constant"
            elif n.startswith("AWS_"):
                assert n in AWS_ENV, f"{c.where}: {n} is not a standard AWS variable"
            elif n == INDEX_ENV:
                assert (c.job_spec or {}).get("completionMode") == "Indexed", c.where
                ref = c.spec["env"][[e["name"] for e in c.spec["env"]].index(n)]
                assert ref["valueFrom"]["fieldRef"]["fieldPath"] == (
                    f"metadata.annotations['{INDEX_ANNOTATION}']"), c.where
            else:
                assert n in services_vars and c.role() == ("snapshot", "run"), (
                    f"{c.where}: {n} is neither documented nor a ${{VAR}} of services.toml")


def test_every_referenced_secret_is_templated_with_placeholders() -> None:
    kust = next(d for f, d in _docs() if f == "kustomization.yaml")
    assert "secrets.example.yaml" not in kust["resources"]
    for s in _objects("Secret"):
        for k, v in (s.get("stringData") or {}).items():
            assert "REPLACE-ME" in v, f"Secret/{s['metadata']['name']}: {k} is not a placeholder"
        assert not s.get("data"), "placeholders go in stringData, readable as such"
    for c in _containers():
        for var in c.spec.get("env") or []:
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in _secret_data(ref["name"]), f"{c.where}: {var['name']}"
        for src in c.spec.get("envFrom") or []:
            if "secretRef" in src:
                _secret_data(src["secretRef"]["name"])
        for v in c.pod.get("volumes") or []:
            if "secret" in v:
                data = _secret_data(v["secret"]["secretName"])
                for item in v["secret"].get("items") or []:
                    assert item["key"] in data, f"{c.where}: {item['key']}"


# -- servers ---------------------------------------------------------------------------------------
def _servers(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
             ) -> Iterator[tuple[Container, argparse.Namespace]]:
    found = [c for c in _containers() if c.role() in SERVERS]
    assert {c.role() for c in found} == SERVERS
    for c in found:
        yield c, _parsed(c, monkeypatch, capsys)


def test_servers_listen_on_every_interface_on_their_container_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for c, ns in _servers(monkeypatch, capsys):
        assert ns.host == "0.0.0.0", f"{c.where}: --host {ns.host} is unreachable from the pod IP"
        ports = [int(p["containerPort"]) for p in c.spec.get("ports") or []]
        assert ports == [ns.port], f"{c.where}: container ports {ports}, --port {ns.port}"


def test_probes_hit_healthz_and_prometheus_scrapes_metrics_on_the_server_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for c, ns in _servers(monkeypatch, capsys):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = c.spec[probe]["httpGet"]
            # /healthz is the one route that needs no token (and no Authorization header here).
            assert get["path"] == "/healthz" and "httpHeaders" not in get, (c.where, probe)
            assert _port_number(get["port"], c) == ns.port, (c.where, probe)
        ann = c.pod_meta.get("annotations") or {}
        assert ann.get("prometheus.io/scrape") == "true", c.where
        assert ann.get("prometheus.io/path") == "/metrics", c.where
        assert int(ann["prometheus.io/port"]) == ns.port, c.where


def test_services_target_the_server_ports(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    services = _objects("Service")
    for c, ns in _servers(monkeypatch, capsys):
        labels = c.pod_meta["labels"]
        mine = [s for s in services if _selects(s["spec"]["selector"], labels)]
        assert mine, f"{c.where}: no Service selects its pods"
        for s in mine:
            for p in s["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                assert _port_number(target, c) == ns.port, s["metadata"]["name"]
        selector = c.workload["spec"]["selector"]["matchLabels"]
        assert _selects(selector, labels), f"{c.where}: selector does not match its pods"


def test_servers_read_their_tokens_from_a_secret_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for c, ns in _servers(monkeypatch, capsys):
        assert not ns.no_auth, f"{c.where}: --no-auth in production"
        path = ns.tokens_file or c.env().get(ttstore.ENV_TOKENS_FILE)
        assert path, f"{c.where}: no tokens file: the server would refuse to start"
        kind, name, key = c.mounted_file(path)
        assert kind == "Secret", f"{c.where}: tokens in a {kind}"
        assert c.mount_source(path)[0].get("readOnly") is True, c.where
        local = tmp_path / f"{name}-{key}"
        local.write_text(_secret_data(name)[key], encoding="utf-8")
        # The servers' own start-up path: a bad line would be a start-up error naming it.
        auth = ttstore.Authenticator.from_options(
            tokens_file=str(local) if ns.tokens_file else None, no_auth=ns.no_auth,
            environ={ttstore.ENV_TOKENS_FILE: str(local)})
        assert not auth.no_auth
        ttstore.load_tokens(local)


def _tokens_of(c: Container, ns: argparse.Namespace) -> dict[str, ttstore.Principal]:
    kind, name, key = c.mounted_file(ns.tokens_file)
    return ttstore.parse_tokens(_secret_data(name)[key])


def test_only_one_single_replica_api_serves_training_set_jobs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    apis = [(c, _parsed(c, monkeypatch, capsys)) for c in _by_role(("api", "serve"))]
    writers = [(c, ns) for c, ns in apis
               if any(ttstore.WRITE in p.scopes for p in _tokens_of(c, ns).values())]
    # POST /v1/training-sets needs `write`: only the job-serving replica accepts it.
    assert len(writers) == 1, [c.where for c, _ in writers]
    jobs, jobs_ns = writers[0]
    assert not jobs_ns.no_jobs, f"{jobs.where}: the job server runs with --no-jobs"
    for c, ns in apis:
        # every other server must neither run nor re-queue jobs at start
        assert c is jobs or ns.no_jobs, f"{c.where}: a read replica without --no-jobs"
    assert jobs.workload["kind"] == "Deployment"
    assert jobs.workload["spec"]["replicas"] == 1
    # Every starting server re-queues unfinished jobs: the old pod must be gone first.
    assert jobs.workload["spec"]["strategy"]["type"] == "Recreate"
    readers = [c for c, _ in apis if c is not jobs]
    assert readers, "no read replicas"
    jobs_secrets = {s["secretRef"]["name"] for s in jobs.spec["envFrom"] if "secretRef" in s}
    for c in readers:
        assert c.workload["spec"]["replicas"] >= 1
        secrets = {s["secretRef"]["name"] for s in c.spec["envFrom"] if "secretRef" in s}
        assert not secrets & jobs_secrets, f"{c.where}: read replicas get the writers' keys"
        assert c.pod["serviceAccountName"] != jobs.pod["serviceAccountName"], c.where


def test_api_workers_and_cache_fit_the_container(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for c in _by_role(("api", "serve")):
        ns = _parsed(c, monkeypatch, capsys)
        limits = c.spec["resources"]["limits"]
        # The engine's default is os.cpu_count(), the node's cores, whatever the pod's limit.
        assert ns.workers is not None, f"{c.where}: set --workers"
        assert ns.workers <= max(1, math.ceil(_cpu(limits["cpu"]))), c.where
        assert _bytes(limits["memory"]) > 2 * ns.cache_bytes, c.where


def test_grace_periods_cover_the_graceful_shutdown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for c, _ns in _servers(monkeypatch, capsys):
        grace = c.pod.get("terminationGracePeriodSeconds", 30)
        # Requests in flight get DEFAULT_SHUTDOWN_TIMEOUT_S, then the cleanup hooks run.
        need = _pre_stop_s(c) + DEFAULT_SHUTDOWN_TIMEOUT_S
        if c.role() == ("facts", "serve"):
            need += IngestConfig().shutdown_flush_timeout_s  # the final flush to the store
        assert grace > need, f"{c.where}: grace {grace}s, shutdown may take {need}s"


# -- ingest: one spool per replica -----------------------------------------------------------------
def test_ingest_replicas_each_have_their_own_persistent_spool(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ingests = _by_role(("facts", "serve"))
    assert ingests
    for c in ingests:
        assert c.workload["kind"] == "StatefulSet", f"{c.where}: replicas would share a spool"
        ns = _parsed(c, monkeypatch, capsys)
        assert Path(ns.spool_dir).is_absolute(), f"{c.where}: spool relative to the workdir"
        _mount, volume = c.mount_source(ns.spool_dir)
        tpl = volume.get("claimTemplate")
        assert tpl is not None, f"{c.where}: {ns.spool_dir} is not on a volumeClaimTemplate"
        assert tpl["spec"]["accessModes"] == ["ReadWriteOnce"], c.where
        spec = c.workload["spec"]
        policy = spec.get("persistentVolumeClaimRetentionPolicy") or {}
        assert policy.get("whenScaled", "Retain") == "Retain", c.where
        assert policy.get("whenDeleted", "Retain") == "Retain", c.where
        headless = _named("Service", spec["serviceName"])
        assert headless["spec"].get("clusterIP") == "None", spec["serviceName"]
        assert _selects(headless["spec"]["selector"], c.pod_meta["labels"])
        # The pod can write its spool: the volume's group is the pod's fsGroup.
        assert c.pod["securityContext"].get("fsGroup") == _dockerfile_uid_gid()[1], c.where


# -- snapshots and compaction ----------------------------------------------------------------------
def _interval_s(cron: str, start_us: int) -> float:
    cadence = snapshotter.Cadence.parse(every=None, cron=cron)
    slot = cadence.slot_at_or_before(start_us)
    gaps = []
    for _ in range(50):
        nxt = cadence.next_slot_after(slot)
        gaps.append(nxt - slot)
        slot = nxt
    return min(gaps) / 1e6


def test_snapshot_cronjob_is_indexed_with_one_shard_per_index(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    snaps = _by_role(("snapshot", "run"))
    assert len(snaps) == 1
    c = snaps[0]
    assert c.workload["kind"] == "CronJob"
    cron = c.workload["spec"]
    job = c.job_spec
    assert job is not None
    raw = c.argv()
    shard = raw[raw.index("--shard") + 1]
    m = re.fullmatch(rf"\$\({INDEX_ENV}\)/(\d+)", shard)
    assert m, f"--shard {shard!r} is not $({INDEX_ENV})/N"
    n = int(m.group(1))
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == n
    assert cron["concurrencyPolicy"] == "Forbid"
    for i in range(n):
        ns = _parse(c.expanded_argv(index=i), c.env(index=i), monkeypatch, capsys)
        assert parse_shard(ns.shard) == (i, n)
        # No fixed --slot (every run would redo one slot); --cron is the CronJob's schedule, so
        # each shard's "latest slot at or before now" is this Job's scheduled time.
        assert ns.slot is None and ns.every is None
        assert ns.cron == cron["schedule"]
    assert cron.get("timeZone") in ("Etc/UTC", "UTC"), "timetravel's cron is UTC"
    # Every pod of one Job must take the same slot: none may start or run past the next one.
    window_s = cron["startingDeadlineSeconds"] + job["activeDeadlineSeconds"]
    assert window_s < _interval_s(cron["schedule"], ttstore.parse_timestamp(
        "2026-11-20T00:00:00Z", field="now")), "a late or retried shard would take the next slot"
    assert c.pod["restartPolicy"] in ("Never", "OnFailure")


def test_services_toml_in_the_configmap_loads_with_the_snapshot_pods_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    c = _by_role(("snapshot", "run"))[0]
    ns = _parsed(c, monkeypatch, capsys)
    kind, name, key = c.mounted_file(ns.services)
    assert kind == "ConfigMap"
    text = _configmap_data(name)[key]
    local = tmp_path / "services.toml"
    local.write_text(text, encoding="utf-8")
    services = snapshotter.load_services(local, environ=c.env())
    assert services and set(services) == set(tomllib.loads(text)["services"])
    assert _services_toml_vars(text), "the example shows a ${VAR} header"
    # Without the pod's env the same file fails: the env really carries every ${VAR}.
    with pytest.raises(snapshotter.ServiceConfigError):
        snapshotter.load_services(local, environ={})


def test_compaction_cronjob_compacts_everything_hourly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    compacts = _by_role(("facts", "compact"))
    assert len(compacts) == 1
    c = compacts[0]
    assert c.workload["kind"] == "CronJob"
    ns = _parsed(c, monkeypatch, capsys)
    assert not ns.fact_types and not ns.dates and not ns.dry_run
    cron = c.workload["spec"]
    interval = _interval_s(cron["schedule"],
                           ttstore.parse_timestamp("2026-11-20T00:00:00Z", field="now"))
    assert interval == 3600
    assert cron["concurrencyPolicy"] == "Forbid"
    assert c.job_spec is not None and c.job_spec["activeDeadlineSeconds"] < interval


# -- the image -------------------------------------------------------------------------------------
def _dockerfile_uid_gid() -> tuple[int, int]:
    users = [rest for ins, rest in _dockerfile().final if ins == "USER"]
    assert users, "deploy/Dockerfile: no USER: the image runs as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit(), "USER uid:gid numeric, so runAsNonRoot can check it"
    return int(uid), int(gid)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_dockerfile_installs_the_package_with_timetravel_as_entrypoint() -> None:
    df = _dockerfile()
    for stage in df.stages:
        assert stage[0][1].split()[0] == "python:3.11-slim", stage[0]
    project = _pyproject()
    assert df.entrypoint == ["timetravel"]
    assert "timetravel" in project["project"]["scripts"]
    installs = [(i, rest) for i, stage in enumerate(df.stages) for ins, rest in stage
                if ins == "RUN" and re.search(r"\bpip install \.(\s|$)", rest)]
    assert len(installs) == 1, "one `pip install .`"
    stage_i, run = installs[0]
    venv_bin = str(Path(run.split()[0]).parent)
    # What `pip install .` needs is in that stage: pyproject, its readme, every package.
    copied: set[str] = set()
    for ins, rest in df.stages[stage_i]:
        if ins == "COPY" and not rest.startswith("--from"):
            copied.update(p.rstrip("/") for p in rest.split()[:-1])
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]
                ["include"] if not p.endswith(".*")}
    assert {"pyproject.toml", project["project"]["readme"]} | packages <= copied
    final = df.final
    if stage_i != len(df.stages) - 1:
        assert any(ins == "COPY" and rest.startswith("--from") and str(Path(venv_bin).parent)
                   in rest for ins, rest in final), "the final stage lacks the installed venv"
    env = " ".join(rest for ins, rest in final if ins == "ENV")
    assert venv_bin in env, f"{venv_bin} (where `timetravel` is installed) is not on PATH"
    # Every pod runs as the image's user, not as root.
    uid, gid = _dockerfile_uid_gid()
    assert uid != 0
    for c in _containers():
        sc = c.pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid, c.where
        assert sc.get("runAsGroup", gid) == gid, c.where


def test_dockerfile_exposes_the_server_ports(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    exposed = {int(p) for ins, rest in _dockerfile().final if ins == "EXPOSE"
               for p in rest.split()}
    assert exposed == {ns.port for _c, ns in _servers(monkeypatch, capsys)}


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch(p, pat) or fnmatch(p, pat.removeprefix("**/"))
               for pat in patterns for p in prefixes)


def test_dockerignore_keeps_what_the_build_copies_and_drops_local_state() -> None:
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "the matcher here has no exceptions"
    for ins, rest in (x for stage in _dockerfile().stages for x in stage):
        if ins == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                src = src.rstrip("/")
                assert (ROOT / src).exists(), src
                assert not _ignored(src, patterns), f"{src} is copied but .dockerignore drops it"
                for f in (ROOT / src).rglob("*.py") if (ROOT / src).is_dir() else []:
                    rel = f.relative_to(ROOT).as_posix()
                    assert not _ignored(rel, patterns), rel
    for local in (".venv", ".git", "tests", "timetravel-data"):
        assert _ignored(local, patterns), local
