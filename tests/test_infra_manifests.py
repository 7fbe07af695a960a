"""Deployment templates render to manifests that wire what the retrain job needs (no cluster involved)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infra.render import RenderError, placeholders, render, render_text

INFRA = Path(__file__).resolve().parents[1] / "infra"
RAYJOB = INFRA / "k8s" / "rayjob.yaml"
CRONJOB = INFRA / "k8s" / "retrain-cronjob.yaml"
CONFIGMAP = INFRA / "k8s" / "configmap-retrain.yaml"
NETWORK_POLICY = INFRA / "k8s" / "networkpolicy.yaml"
LAUNCHER = INFRA / "cluster" / "aws-gpu.yaml"
TEMPLATES = [RAYJOB, CRONJOB, CONFIGMAP, NETWORK_POLICY, LAUNCHER]
HEAD_PORTS = (6379, 8265, 10001)  # GCS, dashboard + job API, Ray client

# Values chosen so that each one is recognisable in the output (and a secret-looking one that must never appear).
VALUES = {
    "NAMESPACE": "mpft-prod",
    "IMAGE": "registry.example.com/mpft:1.2.3",
    "BUCKET": "acme-mpft-data",
    "MLFLOW_TRACKING_URI": "http://mlflow.mpft-prod.svc:5000",
    "AWS_ENDPOINT_URL": "https://s3.eu-west-1.amazonaws.com",
    "AWS_REGION": "eu-west-1",
    "CREDENTIALS_SECRET": "mpft-aws-credentials",
    "NUM_GPU_WORKERS": "3",
    "GPUS_PER_WORKER": "1",
    "NUM_TRAIN_WORKERS": "3",
    "RETRAIN_SCHEDULE": "0 3 * * 0",
    "KUBECTL_IMAGE": "registry.example.com/kubectl:1.31",
    "AMI_ID": "ami-0123456789abcdef0",
    "INSTANCE_PROFILE_ARN": "arn:aws:iam::123456789012:instance-profile/mpft-ray",
    "PROJECT_DIR": "/src/mpft",
    "RAY_AUTH_SECRET": "mpft-ray-auth",
    "KUBERAY_NAMESPACE": "kuberay-system",
    "ADMIN_CIDR": "203.0.113.0/24",
    "RAY_AUTH_TOKEN_FILE": "/home/ops/.ray/auth_token",
}


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(render(path, VALUES)) if doc is not None]


def _one(path: Path, kind: str) -> dict:
    matches = [doc for doc in _docs(path) if doc.get("kind") == kind]
    assert len(matches) == 1, f"expected one {kind} in {path.name}, found {len(matches)}"
    return matches[0]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _walk(node):
    """Every dict inside a parsed manifest (to look for env entries wherever they are)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


# --- render -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_every_template_renders_to_yaml_without_leftover_placeholders(template):
    text = render(template, VALUES)
    assert "${" not in text
    assert _docs(template), "rendered to no YAML document"
    for value in placeholders(template.read_text()):
        assert value in VALUES  # the sample values above cover every placeholder the templates use


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_rendering_fails_naming_the_missing_value(template):
    needed = placeholders(template.read_text())
    incomplete = {k: v for k, v in VALUES.items() if k != needed[-1]}
    with pytest.raises(RenderError, match=needed[-1]):
        render(template, incomplete)


def test_empty_value_counts_as_missing_and_dollar_escapes_survive():
    with pytest.raises(RenderError, match="BUCKET"):
        render_text("uri: s3://${BUCKET}/x", {"BUCKET": ""})
    assert render_text("echo $$HOME ${A}", {"A": "1"}) == "echo $HOME 1"
    with pytest.raises(RenderError, match="line 2"):
        placeholders("ok: 1\nbad: $(date)\n")


# --- RayJob -------------------------------------------------------------------------------------------------------
def test_rayjob_runs_retrain_with_the_mounted_config():
    job = _one(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["namespace"] == VALUES["NAMESPACE"]
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["mpft", "retrain", "--config", "/config/retrain.yaml"]

    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    mounts = {m["mountPath"]: m["name"] for c in _containers(head) for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    config_volume = volumes[mounts["/config"]]
    configmap = _one(CONFIGMAP, "ConfigMap")
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "retrain.yaml" in configmap["data"]


def test_rayjob_runtime_env_sets_offline_hub_and_tracking():
    job = _one(RAYJOB, "RayJob")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    env_vars = runtime_env["env_vars"]
    assert env_vars["HF_HUB_OFFLINE"] == "1"
    assert env_vars["MLFLOW_TRACKING_URI"] == VALUES["MLFLOW_TRACKING_URI"]
    assert env_vars["AWS_ENDPOINT_URL"] == VALUES["AWS_ENDPOINT_URL"]
    assert env_vars["AWS_REGION"] == VALUES["AWS_REGION"]
    assert not any("SECRET" in name or "KEY" in name for name in env_vars)  # secrets never in the runtime env


def test_rayjob_cleans_up_its_cluster():
    spec = _one(RAYJOB, "RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0


def test_rayjob_gpu_workers_request_gpus_and_use_the_image():
    cluster = _one(RAYJOB, "RayJob")["spec"]["rayClusterSpec"]
    head_containers = _containers(cluster["headGroupSpec"]["template"])
    assert {c["image"] for c in head_containers} == {VALUES["IMAGE"]}
    groups = cluster["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                                          for c in _containers(g["template"]))]
    assert len(gpu_groups) == 1
    group = gpu_groups[0]
    assert group["replicas"] == int(VALUES["NUM_GPU_WORKERS"])
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for container in _containers(group["template"]):
        assert container["image"] == VALUES["IMAGE"]
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == int(VALUES["GPUS_PER_WORKER"])
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    # the training config asks for no more Train workers than there are GPUs
    retrain = yaml.safe_load(_one(CONFIGMAP, "ConfigMap")["data"]["retrain.yaml"])
    total_gpus = group["replicas"] * int(VALUES["GPUS_PER_WORKER"])
    assert retrain["train"]["scaling"]["use_gpu"] is True
    assert retrain["train"]["scaling"]["num_workers"] <= total_gpus


def test_rayjob_credentials_come_from_the_secret_only():
    job = _one(RAYJOB, "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        env = {e["name"]: e for c in _containers(pod) for e in c.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name], f"{name} is inline"
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == VALUES["CREDENTIALS_SECRET"]
            assert ref["key"] == name
    # no env entry anywhere carries a literal value for a credential-like name
    for entry in _walk(job):
        if "name" in entry and "value" in entry:
            assert not any(word in entry["name"].upper() for word in ("SECRET", "KEY", "TOKEN", "PASSWORD"))


def _ray_pods(job: dict) -> dict[str, dict]:
    """Every pod template of the RayJob that runs Ray or talks to it: head, worker groups, job submitter."""
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"], "submitter": job["spec"]["submitterPodTemplate"]}
    pods.update({f"worker {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


def test_rayjob_every_ray_pod_and_the_submitter_require_the_token_from_its_secret():
    for role, pod in _ray_pods(_one(RAYJOB, "RayJob")).items():
        for container in _containers(pod):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["RAY_AUTH_MODE"].get("value") == "token", (role, container["name"])
            token = env["RAY_AUTH_TOKEN"]
            assert "value" not in token, f"{role}: the Ray token is inline"
            assert token["valueFrom"]["secretKeyRef"] == {"name": VALUES["RAY_AUTH_SECRET"], "key": "auth_token"}


def test_rayjob_template_holds_only_the_rayjob():
    # `kubectl create -f` runs once per retrain: a fixed-name object beside it (the NetworkPolicy) would collide.
    assert [doc["kind"] for doc in _docs(RAYJOB)] == ["RayJob"]


# --- NetworkPolicy ------------------------------------------------------------------------------------------------
def _selected(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def test_network_policy_covers_every_ray_pod_of_the_rayjob():
    policy = _one(NETWORK_POLICY, "NetworkPolicy")
    assert "Ingress" in policy["spec"]["policyTypes"]
    for role, pod in _ray_pods(_one(RAYJOB, "RayJob")).items():
        assert _selected(policy["spec"]["podSelector"], pod["metadata"]["labels"]), role


def test_network_policy_admits_only_the_cluster_a_labelled_client_and_the_operator():
    policy = _one(NETWORK_POLICY, "NetworkPolicy")
    own_labels = policy["spec"]["podSelector"]["matchLabels"]
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from")
        assert peers, "a rule without `from` admits every source"
        for peer in peers:
            assert "ipBlock" not in peer, peer  # addresses outside the cluster
            assert peer["podSelector"]["matchLabels"], "an empty pod selector admits every pod"
            if peer["podSelector"]["matchLabels"] == own_labels and "namespaceSelector" not in peer:
                continue  # the cluster's own pods: Ray's internal ports
            ports = {p["port"] for p in rule.get("ports", [])}
            assert ports and ports <= {8265, 10001}, f"{peer} may reach ports {ports or 'all'}"
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": VALUES["KUBERAY_NAMESPACE"]}
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert any(peer["podSelector"]["matchLabels"] == {"mpft.io/ray-client": "true"} for peer in peers)


def test_retrain_config_keeps_data_in_the_bucket():
    retrain = yaml.safe_load(_one(CONFIGMAP, "ConfigMap")["data"]["retrain.yaml"])
    bucket = f"s3://{VALUES['BUCKET']}/"
    sources = [*retrain["train"]["train"], *retrain["train"]["val"], *retrain["new_data"], *retrain["holdout"]]
    assert sources and all(source["uri"].startswith(bucket) for source in sources)
    assert retrain["train"]["checkpoint_root"].startswith(bucket)
    # offline hub: the backbone weights must come from storage, not from a hub download tag
    assert retrain["train"]["method"]["detector"]["backbone"]["pretrained"].startswith(bucket)


def test_retrain_config_is_valid_for_the_retrain_command():
    from jobs.retrain import RetrainConfig

    retrain = yaml.safe_load(_one(CONFIGMAP, "ConfigMap")["data"]["retrain.yaml"])
    cfg = RetrainConfig.from_dict(retrain)  # the same validation `mpft retrain --config` applies
    assert cfg.train.scaling.use_gpu and cfg.train.scaling.num_workers == int(VALUES["NUM_TRAIN_WORKERS"])
    assert cfg.train.tracking.registered_model  # promotion works on the registry
    assert cfg.new_data and cfg.holdout


# --- CronJob + RBAC -----------------------------------------------------------------------------------------------
def test_cronjob_schedule_and_no_overlap():
    cron = _one(CRONJOB, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["schedule"] == VALUES["RETRAIN_SCHEDULE"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job_spec = cron["spec"]["jobTemplate"]["spec"]
    assert job_spec["backoffLimit"] == 0  # a pod retry would create a second RayJob


def test_cronjob_creates_the_rayjob_from_the_template_configmap():
    cron = _one(CRONJOB, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    (container,) = _containers(pod)
    assert container["image"] == VALUES["KUBECTL_IMAGE"]
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "kubectl" in script and " create -f /rayjob/rayjob.yaml" in script
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/rayjob")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "mpft-rayjob-template"
    # the RayJob template gets a fresh name per run, so repeated creates cannot collide
    job = _one(RAYJOB, "RayJob")
    assert "generateName" in job["metadata"] and "name" not in job["metadata"]
    # the script's "is a retrain still running" check selects the RayJob by its label
    label = job["metadata"]["labels"]["app.kubernetes.io/name"]
    assert f"app.kubernetes.io/name={label}" in script


def test_cronjob_service_account_may_create_rayjobs():
    cron = _one(CRONJOB, "CronJob")
    account = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    sa = _one(CRONJOB, "ServiceAccount")
    role = _one(CRONJOB, "Role")
    binding = _one(CRONJOB, "RoleBinding")
    assert sa["metadata"]["name"] == account
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account, "namespace": VALUES["NAMESPACE"]} in binding["subjects"]
    rayjob_rules = [r for r in role["rules"] if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]]
    verbs = {verb for rule in rayjob_rules for verb in rule["verbs"]}
    assert {"create", "get", "list"} <= verbs
    assert "delete" not in verbs and "*" not in verbs  # least privilege


def test_all_namespaced_objects_land_in_the_namespace():
    for template in (RAYJOB, CRONJOB, CONFIGMAP, NETWORK_POLICY):
        for doc in _docs(template):
            assert doc["metadata"]["namespace"] == VALUES["NAMESPACE"], (template.name, doc["kind"])


# --- Ray cluster launcher -----------------------------------------------------------------------------------------
def test_launcher_has_an_autoscaling_gpu_worker_type():
    (cfg,) = _docs(LAUNCHER)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"]["region"] == VALUES["AWS_REGION"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert len(gpu_types) == 1
    (gpu,) = gpu_types.values()
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p3.", "p4", "p5"))
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] == int(VALUES["NUM_GPU_WORKERS"])
    assert cfg["max_workers"] >= gpu["max_workers"]
    for node_type in types.values():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"] == VALUES["INSTANCE_PROFILE_ARN"]


def test_launcher_installs_the_project_with_the_constraints_file():
    (cfg,) = _docs(LAUNCHER)
    assert VALUES["PROJECT_DIR"] in cfg["file_mounts"].values()
    remote_dir = next(k for k, v in cfg["file_mounts"].items() if v == VALUES["PROJECT_DIR"])
    installs = [c for c in cfg["setup_commands"] if "pip install" in c and f"-e {remote_dir}" in c]
    assert installs, cfg["setup_commands"]
    assert all(f"-c {remote_dir}/constraints.txt" in c for c in installs)
    assert (Path(__file__).resolve().parents[1] / "constraints.txt").is_file()
    setup = "\n".join(cfg["setup_commands"])
    assert "HF_HUB_OFFLINE=1" in setup and VALUES["MLFLOW_TRACKING_URI"] in setup
    # the raw template never contains credentials: access comes from the instance profile
    raw = LAUNCHER.read_text()
    assert "aws_access_key_id" not in raw.lower() and "AWS_SECRET_ACCESS_KEY" not in raw


def test_launcher_nodes_start_ray_with_token_authentication_and_the_token_file():
    (cfg,) = _docs(LAUNCHER)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == VALUES["RAY_AUTH_TOKEN_FILE"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), cfg[key]
    assert "export RAY_AUTH_MODE=token" in "\n".join(cfg["setup_commands"])  # jobs and `ray` on the node too
    assert "RAY_AUTH_TOKEN=" not in LAUNCHER.read_text()  # the token travels as a file, never in the config


def test_launcher_security_group_opens_only_ssh_and_only_to_the_admin_cidr():
    (cfg,) = _docs(LAUNCHER)
    rules = cfg["provider"]["security_group"]["IpPermissions"]
    assert any(r["FromPort"] <= 22 <= r["ToPort"] for r in rules)  # else the launcher adds SSH from anywhere
    for rule in rules:
        assert [r["CidrIp"] for r in rule["IpRanges"]] == [VALUES["ADMIN_CIDR"]]
        assert not rule.get("Ipv6Ranges") and not rule.get("UserIdGroupPairs")
        assert not any(rule["FromPort"] <= port <= rule["ToPort"] for port in HEAD_PORTS), rule
