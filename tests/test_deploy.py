"""cluster.yaml, the Serve configs and the KubeRay manifests in deploy/: each is checked against the schema
or the code that will read it (Ray's cluster-launcher schema, Serve's deploy schema, our graph, our job
parsers), so a renamed flag, deployment or resource fails here instead of on a cluster."""

import copy
import importlib
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = ("serve/config.yaml", "deploy/serve-cluster.yaml")


def _load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def _graph_names() -> set[str]:
    from serve import app

    return {d.name for d in (app.Fusion, app.Scorer, app.Labels, app.KafkaTagger)}


def check_serve_config(cfg: dict) -> list:
    """Serve accepts it, its import path builds our graph from its args, and every deployment it tunes
    exists in that graph (a renamed deployment would silently drop its settings). Returns the deployments."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(cfg)
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    built = getattr(importlib.import_module(module), attr)(cfg["applications"][0]["args"])
    assert type(built).__name__ == "Application"
    tuned = {d.name for d in app.deployments}
    assert tuned <= _graph_names(), tuned - _graph_names()
    return app.deployments


@pytest.mark.parametrize("rel", SERVE_CONFIGS)
def test_serve_configs_are_valid_for_serve_and_for_our_graph(rel):
    deployments = check_serve_config(_load(rel))
    assert all(d.autoscaling_config for d in deployments if d.name != "KafkaTagger")


def test_cluster_yaml_passes_the_schema_shipped_with_ray():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = _load("cluster.yaml")
    jsonschema.validate(cfg, schema)
    broken = copy.deepcopy(cfg)  # the schema really checks: a misspelt key fails
    broken["available_node_types"]["worker.gpu"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)

    types = cfg["available_node_types"]
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert all(t["min_workers"] <= t["max_workers"] <= cfg["max_workers"] for t in workers)
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # a GPU group
    # setup installs the checkout that file_mounts copies to every node
    target = next(dst for dst, src in cfg["file_mounts"].items() if src == ".")
    assert any("pip install" in c and c.rstrip().endswith(target) for c in cfg["setup_commands"])


def _custom(deployment) -> set[str]:
    """The custom resources a deployment's replicas ask for."""
    opts = deployment.ray_actor_options
    return set(opts.resources or {}) if opts else set()


def test_cluster_offers_every_resource_the_cluster_serve_config_asks_for():
    cluster = _load("cluster.yaml")
    offered = {name for t in cluster["available_node_types"].values() for name in t["resources"]}
    for d in check_serve_config(_load("deploy/serve-cluster.yaml")):
        assert _custom(d) <= offered, (d.name, _custom(d))


def _check_ray_cluster_spec(spec: dict) -> set[str]:
    """The fields KubeRay requires of a RayCluster spec; returns the custom resources the groups offer."""
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    groups = [("head", head)] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    offered: set[str] = set()
    for name, g in groups:
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c["image"] and c["name"] for c in containers), name
        params = g["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams values must be strings"
        if "resources" in params:
            offered |= set(json.loads(json.loads(params["resources"])))  # KubeRay's quoted-JSON form
        mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in g["template"]["spec"].get("volumes", [])}, name
        if name != "head":
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "a GPU worker group for the Fusion replicas"
    return offered


def test_kuberay_rayservice_carries_the_cluster_serve_config():
    doc = _load("deploy/rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService") and doc["metadata"]["name"]
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert serve_cfg["applications"] == _load("deploy/serve-cluster.yaml")["applications"]
    offered = _check_ray_cluster_spec(doc["spec"]["rayClusterConfig"])
    for d in check_serve_config(serve_cfg):
        assert _custom(d) <= offered, d.name


def test_kuberay_rayjob_runs_a_backfill_our_parser_accepts():
    from data_jobs import backfill

    doc = _load("deploy/rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob") and doc["metadata"]["name"]
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "data_jobs.backfill"]
    args = backfill.build_parser().parse_args(argv[3:])  # exits (fails the test) on an unknown flag
    assert args.bundle and args.input and args.output
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_kuberay_raycronjob_retrains_on_a_schedule_with_options_our_parser_accepts():
    from data_jobs import retrain

    doc = _load("deploy/raycronjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob") and doc["metadata"]["name"]
    assert len(doc["spec"]["schedule"].split()) == 5
    job = doc["spec"]["jobTemplate"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "-m", "data_jobs.retrain"]
    args = retrain.build_parser().parse_args(argv[3:])  # exits (fails the test) on an unknown flag
    assert args.store and args.registry and args.min_new_labels > 0
    assert job["shutdownAfterJobFinishes"] is True and job["rayClusterSpec"]["headGroupSpec"]
