"""The deployment files under cluster/ are valid and agree with the code they launch.

- cluster/aws-gpu.yaml validates against the schema of the *installed* Ray, exactly as
  `ray up` checks it, and deliberately corrupted copies do not.
- The KubeRay manifests carry what the KubeRay operator requires.
- The runtime env is a valid Ray runtime env and installs what pyproject.toml declares.
- Every `python search/run.py ...` command we publish (the RayJob's entrypoint and the
  README's examples) is accepted by the real search/run.py (`--dry-run`), and `--help` lists
  every flag they use.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AWS_YAML = CLUSTER / "aws-gpu.yaml"
RAYJOB_YAML = CLUSTER / "kuberay-rayjob.yaml"
RAYCLUSTER_YAML = CLUSTER / "kuberay-raycluster.yaml"
RUNTIME_ENV_YAML = CLUSTER / "runtime_env.yaml"
README = CLUSTER / "README.md"
RUN_PY = Path("search") / "run.py"  # relative to REPO, as in the published commands

GPU_WORKER_TYPE = "gpu-a100"
GPUS_PER_INSTANCE = {"p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8}
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------- helpers


def _load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def _k8s_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def _ray_schema() -> dict:
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"the installed Ray ships no cluster schema at {path}"
    return json.loads(path.read_text())


def validate_cluster_config(config: dict) -> None:
    """Validate a cluster-launcher config the way `ray up` does.

    First the file as written against ray-schema.json, then Ray's own validate_config on the
    config merged with the provider's defaults (what `ray up` validates after loading it).
    Raises jsonschema.ValidationError or ValueError when the config is invalid.
    """
    jsonschema.validate(config, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


def _requirement_key(spec: str) -> tuple[str, str]:
    req = Requirement(spec)
    return canonicalize_name(req.name), str(req.specifier)


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _rayjob() -> dict:
    return _one(_k8s_docs(RAYJOB_YAML), "RayJob")


def _raycluster() -> dict:
    return _one(_k8s_docs(RAYCLUSTER_YAML), "RayCluster")


def _run_py_args(tokens: list[str]) -> list[str] | None:
    """Arguments after `python search/run.py` in a shell command's tokens, or None."""
    for i in range(1, len(tokens)):
        if tokens[i] == str(RUN_PY) and Path(tokens[i - 1]).name in ("python", "python3"):
            args = []
            for tok in tokens[i + 1 :]:
                if tok in ("&&", "||", "|", ";", "&"):
                    break
                args.append(tok)
            return args
    return None


def _rayjob_run_args() -> list[str]:
    tokens = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert tokens[:2] == ["python", str(RUN_PY)], tokens[:2]
    args = _run_py_args(tokens)
    assert args is not None
    return args


def _readme_run_commands() -> list[list[str]]:
    """Argument lists of every `python search/run.py` command in README's code blocks."""
    commands = []
    fence = re.compile(r"^[ \t]*```(?:bash|sh|shell|console)?\n(.*?)^[ \t]*```", re.M | re.S)
    blocks = fence.findall(README.read_text())
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            args = _run_py_args(tokens)
            if args is not None:
                commands.append(args)
    return commands


def _flags(args: list[str]) -> dict[str, str | None]:
    """--flag value pairs of an argument list (value None for a switch)."""
    out: dict[str, str | None] = {}
    for i, tok in enumerate(args):
        if tok.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[tok] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def _pod_containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _cpu_limit(container: dict) -> float:
    cpu = str(container["resources"]["limits"]["cpu"])
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, str(RUN_PY), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# --------------------------------------------------------------------------- AWS launcher


def test_aws_config_validates_against_installed_ray_schema():
    validate_cluster_config(_load_yaml(AWS_YAML))


def _set(path: list[str], value) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(path: list[str]) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        node = cfg
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


GPU_TYPE_PATH = ["available_node_types", GPU_WORKER_TYPE]

CORRUPTIONS = {
    "misspelt-top-level-key": _set(["max_worker"], 4),
    "provider-without-type": _delete(["provider", "type"]),
    "node-type-without-node_config": _delete([*GPU_TYPE_PATH, "node_config"]),
    "gpu-count-as-string": _set([*GPU_TYPE_PATH, "resources"], {"GPU": "8"}),
    "unknown-node-type-key": _set([*GPU_TYPE_PATH, "max_worker"], 4),
    "unknown-docker-key": _set(["docker", "imagee"], "rayproject/ray"),
    "start-commands-not-a-list": _set(["head_start_ray_commands"], "ray start --head"),
    "undefined-head-node-type": _set(["head_node_type"], "no-such-type"),
    "min-workers-above-global-max": _set([*GPU_TYPE_PATH, "min_workers"], 99),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_aws_config_fails_validation(corruption):
    config = _load_yaml(AWS_YAML)
    CORRUPTIONS[corruption](config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_cluster_config(config)


def test_misspelt_key_in_aws_yaml_text_fails_validation():
    text = AWS_YAML.read_text()
    assert "\navailable_node_types:" in text
    broken = yaml.safe_load(text.replace("\navailable_node_types:", "\navailable_node_type:"))
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_cluster_config(broken)


def test_aws_config_shape():
    cfg = _load_yaml(AWS_YAML)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"]["region"] == "us-west-2"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m6i.2xlarge"
    assert head["resources"].get("CPU") == 0, "trials must not land on the CPU head"
    gpu = types[GPU_WORKER_TYPE]
    assert gpu["node_config"]["InstanceType"] in GPUS_PER_INSTANCE
    assert gpu.get("min_workers", 0) == 0, "GPU nodes must scale down to zero"
    assert 1 <= gpu["max_workers"] <= cfg["max_workers"]
    assert cfg["head_start_ray_commands"] and cfg["worker_start_ray_commands"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])
    # The project is synced to every node and installed from there.
    assert "." in cfg["file_mounts"].values()
    mount = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")
    assert any("pip install" in c and mount in c for c in cfg["setup_commands"])


# --------------------------------------------------------------------------- KubeRay


def _check_ray_cluster_spec(spec: dict, docs: list[dict]) -> None:
    """What the KubeRay operator requires of a RayCluster spec, plus our GPU/volume needs."""
    assert spec.get("rayVersion"), "rayVersion tells KubeRay which Ray features to use"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_containers = _pod_containers(head)
    assert head_containers, "headGroupSpec.template.spec.containers is empty"

    groups = spec["workerGroupSpecs"]
    assert isinstance(groups, list) and groups
    for group in groups:
        assert DNS_1123_LABEL.match(group["groupName"]), group["groupName"]
        lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert all(isinstance(x, int) for x in (lo, n, hi))
        assert 0 <= lo <= n <= hi and hi >= 1
        assert _pod_containers(group)
    gpu_groups = [g for g in groups if any(_gpu_limit(c) > 0 for c in _pod_containers(g))]
    assert gpu_groups, "no worker group's container has an nvidia.com/gpu limit"
    if any(g["minReplicas"] < g["maxReplicas"] for g in groups):
        assert spec.get("enableInTreeAutoscaling") is True, "replicas can't move without it"

    all_groups = [head, *groups]
    for group in all_groups:
        # rayStartParams is map[string]string in the CRD: numbers must be quoted.
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), params
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert DNS_1123_LABEL.match(container["name"]), container["name"]
            assert container["image"]
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"

    # One shared results volume (a RWX PVC defined in the same file), mounted at the same
    # path on the head and on every worker: what a local --storage path needs.
    pvcs = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    mount_points = []
    for group in all_groups:
        pod = group["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        ray_container = pod["containers"][0]
        mounted = {
            m["mountPath"]
            for m in ray_container.get("volumeMounts", [])
            if m["name"] in claims and claims[m["name"]] in pvcs
        }
        assert mounted, "results PVC not mounted in this group"
        mount_points.append(mounted)
    assert set.intersection(*mount_points), "the PVC must be mounted at the same path everywhere"
    for pvc in pvcs.values():
        assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_rayjob_manifest_has_what_kuberay_requires():
    docs = _k8s_docs(RAYJOB_YAML)
    job = _one(docs, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert DNS_1123_LABEL.match(job["metadata"]["name"])
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"], docs)


def test_raycluster_manifest_has_what_kuberay_requires():
    docs = _k8s_docs(RAYCLUSTER_YAML)
    cluster = _one(docs, "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    assert DNS_1123_LABEL.match(cluster["metadata"]["name"])
    _check_ray_cluster_spec(cluster["spec"], docs)


def test_raycluster_matches_rayjob_cluster():
    job_spec = _rayjob()["spec"]["rayClusterSpec"]
    cluster_spec = _raycluster()["spec"]
    assert (
        job_spec["headGroupSpec"]["rayStartParams"]
        == cluster_spec["headGroupSpec"]["rayStartParams"]
    )
    for job_group, cluster_group in zip(
        job_spec["workerGroupSpecs"], cluster_spec["workerGroupSpecs"], strict=True
    ):
        assert job_group["groupName"] == cluster_group["groupName"]
        assert (
            job_group["template"]["spec"]["containers"]
            == cluster_group["template"]["spec"]["containers"]
        )


def test_rayjob_sizing_fits_its_cluster():
    """The search's concurrent GPU/CPU demand fits the worker group it runs on."""
    flags = _flags(_rayjob_run_args())
    workers = int(flags["--workers-per-trial"])
    gpus = float(flags["--gpus-per-worker"])
    cpus = float(flags["--cpus-per-worker"])
    concurrent = int(flags["--max-concurrent-trials"])
    (group,) = _rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = _pod_containers(group)
    pod_gpus, pod_cpus = _gpu_limit(container), _cpu_limit(container)
    assert workers * gpus <= pod_gpus, "a trial should fit one pod (NVLink all-reduce)"
    assert workers * cpus + 1 <= pod_cpus, "a trial's workers + trainer must fit one pod"
    assert concurrent * workers * gpus <= group["maxReplicas"] * pod_gpus


def test_readme_search_fits_the_aws_cluster():
    cfg = _load_yaml(AWS_YAML)
    gpu = cfg["available_node_types"][GPU_WORKER_TYPE]
    capacity = gpu["max_workers"] * GPUS_PER_INSTANCE[gpu["node_config"]["InstanceType"]]
    for args in _readme_run_commands():
        flags = _flags(args)
        demand = (
            int(flags.get("--max-concurrent-trials") or 1)
            * int(flags.get("--workers-per-trial") or 1)
            * float(flags.get("--gpus-per-worker") or 0)
        )
        assert demand <= capacity, (args, demand, capacity)


# --------------------------------------------------------------------------- runtime env


def _pip_keys(runtime_env: dict) -> set[tuple[str, str]]:
    pip = runtime_env["pip"]
    packages = pip["packages"] if isinstance(pip, dict) else pip
    return {_requirement_key(p) for p in packages}


def test_runtime_env_is_a_valid_ray_runtime_env():
    env = _load_yaml(RUNTIME_ENV_YAML)
    assert env["working_dir"] == "."
    RuntimeEnv(**env)  # Ray's own validation of every field
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert "OMP_NUM_THREADS" in env["env_vars"]
    excludes = " ".join(env["excludes"])
    for heavy in (".venv", ".git", "runs"):
        assert heavy in excludes, f"{heavy} would be uploaded with every job"


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_runtime_env_pins_the_project_dependencies_but_not_ray():
    """Every dependency pyproject declares (Ray aside) at the exact version of constraints.txt,
    and that version inside pyproject's range: a cluster installs what make installs here."""
    pins = _constraints()
    expected = set()
    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        if name == "ray":
            continue
        assert req.specifier.contains(pins[name]), (dep, pins[name])
        expected.add((name, f"=={pins[name]}"))
    listed = _pip_keys(_load_yaml(RUNTIME_ENV_YAML))
    assert listed == expected
    assert "ray" not in {name for name, _ in listed}


def test_constraints_pin_the_ray_of_the_cluster_image():
    (image,) = {_load_yaml(AWS_YAML)["docker"]["image"]}
    assert _constraints()["ray"] == image.split(":")[1].split("-")[0]


def test_rayjob_runtime_env_matches_runtime_env_yaml():
    job_env = yaml.safe_load(_rayjob()["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**job_env)
    # KubeRay's submitter has no local checkout: the code must come from a URI.
    assert re.match(r"^(s3|gs|https?)://.+\.zip$", job_env["working_dir"]), job_env["working_dir"]
    local_env = _load_yaml(RUNTIME_ENV_YAML)
    assert _pip_keys(job_env) == _pip_keys(local_env)
    assert job_env["env_vars"] == local_env["env_vars"]


def test_all_cluster_files_use_one_ray_image():
    images = {_load_yaml(AWS_YAML)["docker"]["image"]}
    versions = set()
    for spec in (_rayjob()["spec"]["rayClusterSpec"], _raycluster()["spec"]):
        versions.add(spec["rayVersion"])
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            images.update(c["image"] for c in _pod_containers(group))
    assert len(images) == 1, images
    (image,) = images
    repo, tag = image.split(":")
    assert repo == "rayproject/ray"
    assert versions == {tag.split("-")[0]}, (versions, tag)
    python = re.search(r">=\s*3\.(\d+)", _pyproject()["project"]["requires-python"]).group(1)
    assert f"-py3{python}" in tag, "the image's Python must match requires-python"


def test_readme_states_flops_are_macs_and_labels_cost_as_estimate():
    text = README.read_text()
    assert re.search(r"multiply-accumulates", text, re.I)
    assert re.search(r"estimate", text, re.I)
    assert "frontier.parquet" in text and "--resume" in text


# --------------------------------------------------------------------------- vs search/run.py
# These run the real entrypoint. They need search/run.py (with --dry-run and --help).


README_COMMANDS = _readme_run_commands()


def test_readme_has_search_commands():
    assert len(README_COMMANDS) >= 2, "README lost its `python search/run.py` examples"


def test_rayjob_entrypoint_dry_run():
    args = _rayjob_run_args()
    result = _run([*args, "--dry-run"])
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize(
    "args", README_COMMANDS, ids=[f"readme-cmd{i}" for i in range(len(README_COMMANDS))]
)
def test_readme_command_dry_run(args):
    extra = [] if "--dry-run" in args else ["--dry-run"]
    result = _run([*args, *extra])
    assert result.returncode == 0, f"{shlex.join(args)}\n{result.stdout}\n{result.stderr}"


def test_run_py_help_lists_every_flag_used():
    result = _run(["--help"])
    assert result.returncode == 0, result.stderr
    documented = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", result.stdout))
    used = {flag for args in [_rayjob_run_args(), *README_COMMANDS] for flag in _flags(args)}
    used.add("--dry-run")
    missing = sorted(used - documented)
    assert not missing, f"search/run.py --help does not list {missing}"


# --------------------------------------------------------------------------- dashboard exposure


def test_dashboard_on_all_interfaces_only_with_token_auth():
    """--dashboard-host=0.0.0.0 exposes the job API (code execution) to the network: every
    cluster file that does it turns Ray's token authentication on for every node."""
    aws = _load_yaml(AWS_YAML)
    # every container (head and workers) runs with token authentication on
    assert "--env RAY_AUTH_MODE=token" in aws["docker"]["run_options"]
    assert "--dashboard-host=0.0.0.0" in " ".join(aws["head_start_ray_commands"])
    assert "~/.ray/auth_token" in aws["file_mounts"], "workers need the head's token"
    for spec in (_raycluster()["spec"], _rayjob()["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        assert spec.get("authOptions", {}).get("mode") == "token", spec.get("authOptions")
        major, minor = map(int, spec["rayVersion"].split(".")[:2])
        assert (major, minor) >= (2, 52), "Ray token authentication needs Ray >= 2.52"


def test_every_cluster_file_keeps_trial_drivers_on_the_head():
    """The head offers the trial-driver resource (ccpcsa.distributed.capacity.DRIVER_RESOURCE):
    trial drivers ask for it, so they never hold a GPU node's CPU."""
    from ccpcsa.distributed.capacity import DRIVER_RESOURCE

    aws = _load_yaml(AWS_YAML)
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"].get(DRIVER_RESOURCE, 0) >= 100
    assert any(f'"{DRIVER_RESOURCE}": ' in c for c in aws["head_start_ray_commands"])
    for path in (RAYCLUSTER_YAML, RAYJOB_YAML):
        for doc in _k8s_docs(path):
            if doc.get("kind") not in ("RayCluster", "RayJob"):
                continue
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            text = spec["headGroupSpec"]["rayStartParams"]["resources"]
            assert text.startswith('"') and text.endswith('"'), "KubeRay wants the JSON quoted"
            assert json.loads(json.loads(text))[DRIVER_RESOURCE] >= 100, path  # a JSON string
