"""Offline checks of the Helm chart ``deploy/helm/loyalist`` (``make lint-helm``):

for the default values and each ``ci/*-values.yaml`` file: ``helm lint --strict``, ``helm template``, every
rendered manifest validated against the Kubernetes OpenAPI schemas bundled with kubernetes-validate (strict:
unknown fields are errors), plus what schemas cannot see — duplicate YAML keys, selectors that match their
pods, probes on the declared port, Services/PDBs/HPAs/ServiceMonitor pointing at what exists, ``LOYALIST_*``
settings that exist and URLs that name rendered Services, the PrometheusRule passing ``promtool check rules``
and one dashboard ConfigMap per dashboard JSON.

    python -m loyalist.checks.helm [--helm PATH] [--kube-version 1.31.0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from loyalist.settings import SERVICE_NAMES, Settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "loyalist"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys (the API server would silently keep one)."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def find_helm(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).exists() else None
    found = shutil.which("helm")
    if found:
        return found
    try:
        gopath = subprocess.run(["go", "env", "GOPATH"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    candidate = Path(gopath) / "bin" / "helm"
    return str(candidate) if gopath and candidate.exists() else None


@dataclass
class Rendered:
    name: str
    values: dict[str, Any]
    docs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def named(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.of_kind(kind) if d["metadata"]["name"] == name), None)

    def problem(self, message: str) -> None:
        self.problems.append(f"[{self.name}] {message}")


def _helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def _quiet(stderr: str) -> str:
    # Helm logs every followed symlink (the chart links dashboards/ and rules/ to their single source).
    return "\n".join(ln for ln in stderr.splitlines() if "symbolic link" not in ln)


def render(helm: str, values_files: Sequence[Path], kube_version: str, name: str,
           extra_args: Sequence[str] = ()) -> Rendered:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for file in values_files:
        values = _merge(values, yaml.safe_load(file.read_text()) or {})
    out = Rendered(name, values)
    flags = [arg for file in values_files for arg in ("-f", str(file))] + list(extra_args)
    lint = _helm(helm, "lint", "--strict", str(CHART), *flags)
    if lint.returncode != 0:
        out.problem(f"helm lint --strict failed:\n{lint.stdout}{_quiet(lint.stderr)}")
    result = _helm(helm, "template", "loyalist", str(CHART), "--namespace", "loyalist",
                   "--kube-version", kube_version, *flags)
    if result.returncode != 0:
        out.problem(f"helm template failed: {_quiet(result.stderr)}")
        return out
    try:
        out.docs = [d for d in yaml.load_all(result.stdout, Loader=UniqueKeyLoader) if d]
    except yaml.YAMLError as exc:
        out.problem(f"rendered YAML: {exc}")
    return out


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_schemas(out: Rendered, kube_version: str) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    for doc in out.docs:
        ident = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            out.problem(f"{ident}: {path}: {exc.message}")
        except SchemaNotFoundError:
            if (doc.get("apiVersion"), doc.get("kind")) not in CRD_KINDS:
                out.problem(f"{ident}: no Kubernetes {kube_version} schema for {doc.get('apiVersion')}")


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_coherence(out: Rendered, promtool: str | None) -> None:
    values = out.values
    deployments = {d["metadata"]["name"]: d for d in out.of_kind("Deployment")}
    services = {s["metadata"]["name"]: s for s in out.of_kind("Service")}
    configmaps = {c["metadata"]["name"]: c for c in out.of_kind("ConfigMap")}
    secrets = {s["metadata"]["name"] for s in out.of_kind("Secret")}
    enabled = [n for n in SERVICE_NAMES if values["services"][n]["enabled"]]
    for name in enabled:
        if not any(d["spec"]["template"]["spec"]["containers"][0]["command"][-1] == f"services.{name}"
                   for d in deployments.values()):
            out.problem(f"no Deployment runs services.{name}")
    pod_labels = {n: d["spec"]["template"]["metadata"].get("labels", {}) for n, d in deployments.items()}
    for name, dep in deployments.items():
        spec = dep["spec"]
        if not _matches(spec["selector"].get("matchLabels", {}), pod_labels[name]):
            out.problem(f"Deployment/{name}: selector does not match its pod labels")
        pod = spec["template"]["spec"]
        for container in pod["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            is_service = str(container.get("command", [""])[-1]).startswith("services.")
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = (container.get(probe) or {}).get("httpGet") or {}
                if is_service and get.get("path") != path:
                    out.problem(f"Deployment/{name}: {probe} must GET {path}")
                elif not get:
                    out.problem(f"Deployment/{name}: no HTTP {probe}")
                if get.get("port") not in ports and get.get("port") not in ports.values():
                    out.problem(f"Deployment/{name}: {probe} port {get.get('port')!r} is not a container port")
            if not (container.get("resources") or {}).get("requests"):
                out.problem(f"Deployment/{name}: container {container['name']} has no resource requests")
            for source in container.get("envFrom", []):
                if "configMapRef" in source and source["configMapRef"]["name"] not in configmaps:
                    out.problem(f"Deployment/{name}: ConfigMap {source['configMapRef']['name']} is not rendered")
                ref = (source.get("secretRef") or {}).get("name")
                if ref and ref not in secrets and ref != values["secrets"].get("existingSecret"):
                    out.problem(f"Deployment/{name}: Secret {ref} is neither rendered nor the existingSecret")
            volumes = {v["name"] for v in pod.get("volumes", [])}
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    out.problem(f"Deployment/{name}: volumeMount {mount['name']} has no volume")
    for name, svc in services.items():
        targets = [d for d, labels in pod_labels.items() if _matches(svc["spec"].get("selector", {}), labels)]
        if len(targets) != 1:
            out.problem(f"Service/{name}: selector matches {len(targets)} Deployments, expected 1")
            continue
        container = deployments[targets[0]]["spec"]["template"]["spec"]["containers"][0]
        names = {p.get("name") for p in container.get("ports", [])}
        for port in svc["spec"]["ports"]:
            if port.get("targetPort") not in names and port.get("targetPort") != port.get("port"):
                out.problem(f"Service/{name}: targetPort {port.get('targetPort')!r} is not a container port")
    for pdb in out.of_kind("PodDisruptionBudget"):
        if not any(_matches(pdb["spec"]["selector"].get("matchLabels", {}), lb) for lb in pod_labels.values()):
            out.problem(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects no pods")
    for hpa in out.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            out.problem(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: no Deployment {target}")
        elif "replicas" in deployments[target]["spec"]:
            out.problem(f"Deployment/{target}: sets replicas while an HPA manages it (each upgrade resets it)")
        if hpa["spec"]["minReplicas"] > hpa["spec"]["maxReplicas"]:
            out.problem(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: minReplicas > maxReplicas")
    _check_config(out, configmaps, services)
    _check_monitoring(out, services, promtool)


def _check_config(out: Rendered, configmaps: dict[str, Any], services: dict[str, Any]) -> None:
    config = next((c for n, c in configmaps.items() if n.endswith("-config")), None)
    if config is None:
        out.problem("no settings ConfigMap (*-config) rendered")
        return
    data: dict[str, str] = config.get("data") or {}
    fields = {k.removeprefix("LOYALIST_").lower(): v for k, v in data.items() if k.startswith("LOYALIST_")}
    unknown = sorted(k for k in fields if k not in Settings.model_fields)
    if unknown:
        out.problem(f"ConfigMap/{config['metadata']['name']}: not Loyalist settings: {unknown}")
        return
    settings = Settings.model_validate(fields)
    for name in SERVICE_NAMES:
        url = urlsplit(settings.service_url(name))
        svc = services.get(url.hostname or "")
        if out.values["services"][name]["enabled"] and (
            svc is None or url.port not in {p["port"] for p in svc["spec"]["ports"]}
        ):
            out.problem(f"LOYALIST_{name.upper()}_URL={settings.service_url(name)} names no rendered Service port")
    if settings.host != "0.0.0.0":
        out.problem("LOYALIST_HOST must be 0.0.0.0 in a pod")
    for job in out.of_kind("Job"):
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        if env != data:
            out.problem(f"Job/{job['metadata']['name']}: its inline settings differ from the ConfigMap's")


def _check_monitoring(out: Rendered, services: dict[str, Any], promtool: str | None) -> None:
    for monitor in out.of_kind("ServiceMonitor"):
        spec = monitor["spec"]
        selected = [s for s in services.values()
                    if _matches(spec["selector"].get("matchLabels", {}), s["metadata"].get("labels", {}))]
        # Every enabled entry of services (the five, and a second deployment such as profile-api).
        expected = sum(1 for svc in out.values["services"].values() if svc.get("enabled"))
        expected += 1 if out.values.get("lagExporter", {}).get("enabled") else 0
        if len(selected) != expected:
            out.problem(f"ServiceMonitor: selects {len(selected)} Services, expected {expected} (every enabled one)")
        for svc in selected:
            if spec.get("jobLabel") and spec["jobLabel"] not in svc["metadata"].get("labels", {}):
                out.problem(f"ServiceMonitor: Service {svc['metadata']['name']} lacks jobLabel {spec['jobLabel']}")
            for endpoint in spec.get("endpoints", []):
                if endpoint.get("port") not in {p.get("name") for p in svc["spec"]["ports"]}:
                    out.problem(f"ServiceMonitor: port {endpoint.get('port')!r} not on {svc['metadata']['name']}")
    for rule in out.of_kind("PrometheusRule"):
        groups = rule["spec"].get("groups") or []
        if not groups:
            out.problem("PrometheusRule: no groups")
            continue
        if promtool is None:
            out.problem("PrometheusRule: promtool not installed, cannot check the rendered rules")
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as fh:
            yaml.safe_dump({"groups": groups}, fh)
        result = subprocess.run([promtool, "check", "rules", fh.name], capture_output=True, text=True, timeout=60)
        Path(fh.name).unlink(missing_ok=True)
        if result.returncode != 0:
            out.problem(f"PrometheusRule fails promtool check rules: {result.stdout}{result.stderr}")
    if out.values["grafanaDashboards"]["enabled"]:
        sources = sorted(p.name for p in (REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
        rendered = sorted(k for c in out.of_kind("ConfigMap") for k in (c.get("data") or {}) if k.endswith(".json"))
        if rendered != sources:
            out.problem(f"dashboard ConfigMaps hold {rendered}, the repository has {sources}")
        for cm in out.of_kind("ConfigMap"):
            for key, text in (cm.get("data") or {}).items():
                if key.endswith(".json"):
                    try:
                        json.loads(text)
                    except ValueError as exc:
                        out.problem(f"ConfigMap/{cm['metadata']['name']}: {key} is not JSON: {exc}")


def check_chart(helm: str, kube_version: str = "1.31.0", values_sets: Sequence[Sequence[Path]] | None = None,
                extra_args: Sequence[str] = ()) -> list[Rendered]:
    promtool = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if values_sets is None:
        values_sets = [[], *([f] for f in sorted((CHART / "ci").glob("*-values.yaml")))]
    results = []
    for files in values_sets:
        name = ", ".join(f.name for f in files) or "default values"
        out = render(helm, files, kube_version, name, extra_args)
        if out.docs:
            validate_schemas(out, kube_version)
            check_coherence(out, promtool)
        results.append(out)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loyalist.checks.helm", description=__doc__.split("\n")[0])
    parser.add_argument("--helm", default=None, help="helm binary (default: PATH, then $(go env GOPATH)/bin)")
    parser.add_argument("--kube-version", default="1.31.0")
    args = parser.parse_args(argv)
    helm = find_helm(args.helm)
    if helm is None:
        print("helm not found: `make lint-helm` installs it with go install", file=sys.stderr)
        return 2
    failed = False
    for out in check_chart(helm, args.kube_version):
        if out.problems:
            failed = True
            for problem in out.problems:
                print(problem, file=sys.stderr)
        else:
            kinds = sorted({d["kind"] for d in out.docs})
            print(f"helm chart OK [{out.name}]: {len(out.docs)} manifests valid for Kubernetes {args.kube_version} "
                  f"({', '.join(kinds)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
