"""deploy/: every Kubernetes manifest validates offline (kubernetes-validate, strict, against one named Kubernetes
version), the KServe InferenceService has the fields KServe needs, and every image, port, path and environment
variable in them is the service's own (a test fails when the two drift). No cluster and no server: fast."""

from __future__ import annotations

import re
import sys
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"
KSERVE = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
# The oldest Kubernetes minor still in upstream support when this was written; the schemas ship inside
# kubernetes-validate (pinned in pyproject.toml), so validation needs no network.
KUBERNETES_VERSION = "1.33.0"
# BentoML's own probes, answered by its HTTP server whatever the service is (docs/SERVING.md).
BENTOML_PROBES = {"/livez", "/readyz", "/healthz"}


def manifests() -> list[tuple[Path, dict]]:
    return [(path, document) for path in sorted(KUBERNETES.glob("*.yaml"))
            for document in yaml.safe_load_all(path.read_text()) if document]


def documents_of_kind(kind: str) -> list[dict]:
    return [document for _, document in manifests() if document["kind"] == kind]


def kserve_document() -> dict:
    return yaml.safe_load(KSERVE.read_text())


def pod_specs() -> list[tuple[str, dict]]:
    """Every pod spec the deploy folder runs: each Deployment's template and the KServe predictor."""
    specs = [(deployment["metadata"]["name"], deployment["spec"]["template"]["spec"])
             for deployment in documents_of_kind("Deployment")]
    return specs + [("kserve predictor", kserve_document()["spec"]["predictor"])]


def containers() -> list[tuple[str, dict]]:
    return [(owner, container) for owner, spec in pod_specs() for container in spec["containers"]]


def make_variable(name: str) -> str:
    """A Makefile variable's value as make computes it (`make print-NAME`), the one source of these settings."""
    result = subprocess.run(["make", "-s", "--no-print-directory", f"print-{name}"], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("path,document", [pytest.param(path, document, id=f"{path.name}:{document['kind']}")
                                           for path, document in manifests()])
def test_manifest_validates_strictly(path, document):
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{path.name}: {document['kind']} {'.'.join(map(str, error.path))}: {error.message}")


def test_every_kind_the_deployment_needs_is_there():
    kinds = {document["kind"] for _, document in manifests()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert {d["apiVersion"] for d in documents_of_kind("HorizontalPodAutoscaler")} == {"autoscaling/v2"}
    (hpa,) = documents_of_kind("HorizontalPodAutoscaler")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    gpu = [d for d in documents_of_kind("Deployment") if d["metadata"]["name"].endswith("-gpu")]
    assert len(gpu) == 1, "one GPU variant"


def test_kserve_predictor_pod_fields_validate_as_a_pod_spec():
    """KServe's predictor is a PodSpec plus its own scaling fields: the PodSpec part is checked by Kubernetes'
    schema (a CRD schema does not ship with kubernetes-validate)."""
    predictor = dict(kserve_document()["spec"]["predictor"])
    for field in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"):
        predictor.pop(field)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": predictor}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_kserve_has_the_fields_kserve_requires():
    document = kserve_document()
    assert document["apiVersion"] == "serving.kserve.io/v1beta1" and document["kind"] == "InferenceService"
    annotations = document["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa"
    predictor = document["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in ("cpu", "memory") and 0 < predictor["scaleTarget"] <= 100
    (container,) = predictor["containers"]  # a custom predictor is one container
    assert container["name"] == "kserve-container"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["PROTOCOL"] == "v2"  # a custom container's protocol comes from its env, not protocolVersion
    assert len(container["ports"]) == 1  # KServe routes to the one declared port
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_image_is_the_one_make_image_builds():
    image = make_variable("IMAGE")
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert image == f"visionserve:{version}"
    for owner, container in containers():
        expected = f"{image}-gpu" if owner.endswith("-gpu") else image
        assert container["image"] == expected, owner


def test_port_is_the_service_port():
    """One port everywhere: make serve's PORT, the port the bento's image listens on (BentoML's default, which
    the Dockerfile EXPOSEs), the Service, the probes and the scrape annotations."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    port = int(make_variable("PORT"))
    assert port == BentoMLContainer.http.port.get()
    for owner, container in containers():
        assert [p["containerPort"] for p in container["ports"]] == [port], owner
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in (port, "http"), (owner, probe)
    (service,) = documents_of_kind("Service")
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    for policy in documents_of_kind("NetworkPolicy"):
        assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [port]
    for annotations in ([d["spec"]["template"]["metadata"]["annotations"] for d in documents_of_kind("Deployment")]
                        + [kserve_document()["metadata"]["annotations"]]):
        assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] == "/metrics"


def test_probe_paths_are_answered_and_open_without_the_api_key():
    """Each probe path is one the service answers (BentoML's probes or a V2 route) and one the API-key
    middleware leaves open: a probe that gets 401 would mark every pod dead once VISIONSERVE_API_KEY is set."""
    from service import v2
    from service.security import OPEN_PATHS

    answered = BENTOML_PROBES | {route.path for route in v2.ROUTES}
    for owner, container in containers():
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert path in answered, (owner, probe, path)
            assert path in OPEN_PATHS, (owner, probe, path, "needs the API key")


def served_variables() -> set[str]:
    """VISIONSERVE_* names the service reads: the suffix is a string literal in service/, and SERVING.md's table
    documents the full name."""
    source = "\n".join(path.read_text() for path in (REPO / "service").glob("*.py"))
    documented = set(re.findall(r"^\| `(VISIONSERVE_[A-Z_]+)`", (REPO / "docs" / "SERVING.md").read_text(), re.M))
    return {name for name in documented if f'"{name.removeprefix("VISIONSERVE_")}"' in source}


def test_every_environment_variable_is_one_the_service_reads():
    read = served_variables()
    for owner, container in containers():
        for item in container["env"]:
            name = item["name"]
            if owner == "kserve predictor" and name == "PROTOCOL":
                continue  # KServe's, not ours
            assert name in read, f"{owner}: {name} is not read by service/ or not in docs/SERVING.md"


def test_threads_match_the_cpu_limit_and_the_api_key_comes_from_a_secret():
    for owner, container in containers():
        env = {item["name"]: item for item in container["env"]}
        # sched_getaffinity sees the node's cores, not the pod's limit: the pod must say how many it has.
        threads, workers = int(env["VISIONSERVE_THREADS"]["value"]), int(env["VISIONSERVE_WORKERS"]["value"])
        assert threads * workers == int(container["resources"]["limits"]["cpu"]), owner
        assert set(container["resources"]["requests"]) >= {"cpu", "memory"}, owner
        assert "secretKeyRef" in env["VISIONSERVE_API_KEY"]["valueFrom"] and "value" not in env["VISIONSERVE_API_KEY"]
        gpu = owner.endswith("-gpu")
        assert env["VISIONSERVE_DEVICE"]["value"] == ("cuda" if gpu else "cpu"), owner
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) == gpu, owner


def test_pods_run_locked_down():
    for owner, spec in pod_specs():
        assert spec["automountServiceAccountToken"] is False, owner
        assert spec["securityContext"]["runAsNonRoot"] is True, owner
        writable = {volume["name"] for volume in spec["volumes"] if "emptyDir" in volume}
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, owner
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, owner
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            # BentoML writes Prometheus' multiprocess files under BENTOML_HOME (/home/bentoml in its image).
            assert mounts.keys() >= {"/tmp", "/home/bentoml/prometheus_multiproc_dir"}, owner
            assert set(mounts.values()) <= writable, owner


def test_selectors_match_the_pods():
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in documents_of_kind("Deployment")]
    selectors = ([d["spec"]["selector"]["matchLabels"] for d in documents_of_kind("Deployment")]
                 + [d["spec"]["selector"]["matchLabels"] for d in documents_of_kind("PodDisruptionBudget")]
                 + [d["spec"]["podSelector"]["matchLabels"] for d in documents_of_kind("NetworkPolicy")])
    (service,) = documents_of_kind("Service")
    selectors.append(service["spec"]["selector"])
    for selector in selectors:
        assert any(selector.items() <= pod.items() for pod in labels), selector
    (hpa,) = documents_of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in {d["metadata"]["name"] for d in documents_of_kind("Deployment")}


def test_gpu_bento_is_the_bento_plus_onnxruntime_gpus_own_cuda_wheels():
    """`make bento GPU=1` generates its template from bentofile.yaml (deploy/gpu_bentofile.py), so the two cannot
    drift; it adds the pinned CUDA 13 / cuDNN 9 wheels and makes the image refuse to run on CPU."""
    sys.path.insert(0, str(REPO / "deploy"))
    try:
        import gpu_bentofile
    finally:
        sys.path.pop(0)
    template = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    requirements = gpu_bentofile.gpu_requirements(REPO / "deploy" / "requirements-gpu.txt")
    assert "onnxruntime-gpu[cuda,cudnn]==1.31.1" in requirements
    assert all(re.fullmatch(r"[a-z0-9-]+(\[[a-z,]+\])?==[0-9.]+", line) for line in requirements), requirements
    gpu = gpu_bentofile.gpu_bentofile(template, requirements)
    assert {key: value for key, value in gpu.items() if key not in ("python", "envs")} == \
        {key: value for key, value in template.items() if key not in ("python", "envs")}
    assert [p for p in gpu["python"]["packages"] if p.startswith("onnxruntime")] == ["onnxruntime-gpu[cuda,cudnn]==1.31.1"]
    assert set(template["python"]["packages"]) - {"onnxruntime-gpu==1.31.1"} <= set(gpu["python"]["packages"])
    assert {"name": "VISIONSERVE_DEVICE", "value": "cuda"} in gpu["envs"]


def test_deploy_doc_names_every_manifest():
    doc = (REPO / "docs" / "DEPLOY.md").read_text()
    for path in [*KUBERNETES.glob("*.yaml"), KSERVE]:
        assert path.name in doc, path.name
