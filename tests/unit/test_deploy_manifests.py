"""The deployment files (ops/deploy, ops/grafana) parse and agree with the code: every component has
probes, resources and a disruption budget; every MSGCORE_* variable is a setting; every image is the
one the Dockerfile builds; every metric a dashboard queries is defined in core/metrics.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from core import metrics
from core.config import Settings
from ops.cli import run

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "ops/deploy"
GRAFANA = ROOT / "ops/grafana"
COMPONENTS = ("api", "router", "scheduler", "connector", "projector")
IMAGE = "msgcore:latest"
# MSGCORE_* variables read by a CLI option rather than Settings.
CLI_ENV = {"MSGCORE_BI_PASSWORD"}
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def yaml_files() -> list[Path]:
    return sorted(p for d in (DEPLOY, GRAFANA) for p in d.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s() -> list[dict[str, Any]]:
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in load_all(p)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s() if d["kind"] == kind]


def compose() -> dict[str, Any]:
    return load_all(DEPLOY / "compose.yaml")[0]


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert load_all(path)


def test_dashboards_parse_with_unique_ids() -> None:
    boards = dashboards()
    assert len(boards) >= 2
    assert len({b["uid"] for b in boards}) == len(boards)
    for b in boards:
        ids = [p["id"] for p in b["panels"]]
        assert len(set(ids)) == len(ids), b["uid"]


# ---- kubernetes ------------------------------------------------------------------------------------

def test_every_component_has_a_deployment_with_probes_and_resources() -> None:
    deployments = {d["spec"]["template"]["spec"]["containers"][0]["args"][0]: d for d in of_kind("Deployment")}
    assert set(deployments) == set(COMPONENTS)
    for component, d in deployments.items():
        [c] = d["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", component
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", component
        for probe in (c["livenessProbe"], c["readinessProbe"]):
            assert probe["httpGet"]["port"] in ports, component
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), component
        assert c["image"] == IMAGE
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) in ports.values()


def test_every_deployment_has_a_disruption_budget_and_the_api_an_autoscaler() -> None:
    budgets = [p["spec"]["selector"]["matchLabels"] for p in of_kind("PodDisruptionBudget")]
    for d in of_kind("Deployment"):
        assert d["spec"]["selector"]["matchLabels"] in budgets, d["metadata"]["name"]
    [hpa] = of_kind("HorizontalPodAutoscaler")
    api = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"])
    assert api["metadata"]["labels"]["app.kubernetes.io/component"] == "api"
    assert hpa["spec"]["minReplicas"] >= 2


def test_settings_come_from_the_configmap_and_secret_that_exist() -> None:
    config_maps = {c["metadata"]["name"] for c in of_kind("ConfigMap")}
    secrets = {s["metadata"]["name"] for s in of_kind("Secret")}
    for d in [*of_kind("Deployment"), *of_kind("Job")]:
        for c in d["spec"]["template"]["spec"]["containers"]:
            for ref in c["envFrom"]:
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in config_maps
                else:
                    assert ref["secretRef"]["name"] in secrets
    [secret] = of_kind("Secret")
    assert {"MSGCORE_MONGO_URL", "MSGCORE_PG_URL", "MSGCORE_ADMIN_KEY"} <= set(secret["stringData"])
    assert "replicaSet=" in secret["stringData"]["MSGCORE_MONGO_URL"]
    [config] = of_kind("ConfigMap")
    worker_ports = {c["containerPort"] for d in of_kind("Deployment") for c in d["spec"]["template"]["spec"][
        "containers"][0]["ports"] if d["metadata"]["labels"]["app.kubernetes.io/component"] != "api"}
    assert worker_ports == {int(config["data"]["MSGCORE_METRICS_PORT"])}


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    [kust] = load_all(DEPLOY / "k8s/kustomization.yaml")
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(kust["resources"]) == files


# ---- environment variables and images ----------------------------------------------------------------

def referenced_env() -> set[str]:
    names: set[str] = set()
    for d in [*of_kind("ConfigMap")]:
        names |= set(d["data"])
    for d in of_kind("Secret"):
        names |= set(d["stringData"])
    for service in compose()["services"].values():
        env = service.get("environment") or {}
        names |= set(env if isinstance(env, dict) else (e.split("=", 1)[0] for e in env))
    names |= set(re.findall(r"\b(MSGCORE_[A-Z_]+)=", (DEPLOY / "Dockerfile").read_text()))
    return {n for n in names if n.startswith("MSGCORE_")}


def test_every_msgcore_variable_is_a_setting() -> None:
    prefix = Settings.model_config["env_prefix"]
    fields = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    unknown = referenced_env() - fields - CLI_ENV
    assert not unknown, f"not settings of core/config.py: {sorted(unknown)}"


def test_compose_runs_every_component_from_the_image_the_dockerfile_builds() -> None:
    services = compose()["services"]
    assert (DEPLOY / services["api"]["build"]["context"] / services["api"]["build"]["dockerfile"]).exists()
    commands = {c.name or c.callback.__name__ for c in run.app.registered_commands}  # type: ignore[union-attr]
    for component in COMPONENTS:
        s = services[component]
        assert s["image"] == IMAGE and s["command"][0] == component and s["command"][0] in commands
        assert "healthcheck" in s, component
    for worker in ("router", "scheduler", "connector", "projector"):
        assert services[worker]["deploy"]["replicas"] >= 2
    for d in of_kind("Deployment"):
        assert d["spec"]["template"]["spec"]["containers"][0]["args"][0] in commands
    assert 'ENTRYPOINT ["msgcore"]' in (DEPLOY / "Dockerfile").read_text()


def test_compose_has_a_three_node_replica_set_initiated_once() -> None:
    services = compose()["services"]
    mongods = [n for n, s in services.items() if s.get("command", [None])[0] == "mongod"]
    assert len(mongods) == 3
    init = services["mongo-init"]
    assert init["restart"] == "no" and all(m in " ".join(init["command"]) for m in mongods)
    assert "replicaSet=rs0" in services["api"]["environment"]["MSGCORE_MONGO_URL"]


def test_prometheus_scrapes_every_component_on_its_port() -> None:
    [config] = load_all(DEPLOY / "prometheus.yml")
    services = compose()["services"]
    scraped = {}
    for job in config["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                scraped[name] = sd["port"]
    env = services["api"]["environment"]
    assert scraped == {"api": int(env["MSGCORE_API_PORT"]),
                       **{w: int(env["MSGCORE_METRICS_PORT"]) for w in COMPONENTS if w != "api"}}


# ---- dashboards and the metric catalogue -------------------------------------------------------------

def defined_metrics() -> set[str]:
    return {f.name for f in REGISTRY.collect()} | {n.removesuffix("_total") for n in metrics.STORE_GAUGE_NAMES}


def base_name(sample: str, defined: set[str]) -> str:
    if sample in defined:
        return sample
    for suffix in SUFFIXES:
        if sample.endswith(suffix) and sample.removesuffix(suffix) in defined:
            return sample.removesuffix(suffix)
    return sample


def test_dashboards_query_only_metrics_the_code_defines() -> None:
    defined = defined_metrics()
    exprs = [t["expr"] for b in dashboards() for p in b["panels"] for t in p.get("targets", []) if "expr" in t]
    assert len(exprs) >= 20
    used = {base_name(m, defined) for e in exprs for m in re.findall(r"\b((?:msgcore|process)_[a-z_]+)", e)}
    assert used - defined == set()


def test_the_catalogue_covers_what_issue_14_asks_for() -> None:
    wanted = {
        "msgcore_events_appended", "msgcore_accepted_to_submit_seconds", "msgcore_submit_to_receipt_seconds",
        "msgcore_backlog_messages", "msgcore_smpp_binds", "msgcore_smpp_window_in_use", "msgcore_smpp_submits",
        "msgcore_smpp_tps_limit", "msgcore_smpp_throttled", "msgcore_smpp_reconnects", "msgcore_orphan_receipts",
        "msgcore_possible_duplicates", "msgcore_projector_lag_seconds", "msgcore_projector_lag_events",
        "msgcore_api_requests", "msgcore_api_request_duration_seconds",
    }
    assert wanted <= defined_metrics()


def test_every_panel_uses_the_dashboard_data_source_variable() -> None:
    for b in dashboards():
        assert b["templating"]["list"][0]["name"] == "datasource"
        for p in b["panels"]:
            if p["type"] != "row":
                assert p["datasource"]["uid"] == "${datasource}", (b["uid"], p["title"])
