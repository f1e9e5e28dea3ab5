"""Shared fixtures: the real sample volumes, the real LiteMedSAM weights, a moto S3 server."""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def samples_root():
    """The pyradiomics-bhklab sample cohort (fetched through pip once, then cached)."""
    from medclipsam.storage.samples import fetch_samples

    return fetch_samples()


@pytest.fixture(scope="session", autouse=True)
def offline_hub():
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach the Hugging Face hub in tests
    yield


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A small BiomedCLIP-shaped model saved in BiomedCLIP's on-disk layout."""
    from tiny_clip import save_tiny_biomedclip

    return save_tiny_biomedclip(tmp_path_factory.mktemp("biomedclip") / "tiny-biomedclip")


@pytest.fixture(scope="session")
def clip(tiny_clip_dir):
    from medclipsam.models.biomedclip import load_clip

    return load_clip(str(tiny_clip_dir))


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """An initialised MLflow sqlite store (its schema migrations take seconds: done once, then copied)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture()
def tracking_uri(tmp_path, mlflow_template):
    """A fresh MLflow store for one test."""
    import shutil

    path = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole session (2 CPUs, as on CI).

    Started after the S3 server, so its workers inherit the endpoint and credentials.
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def litemedsam():
    from medclipsam.models.sam_backends import build_segmenter

    return build_segmenter("litemedsam")


@pytest.fixture(scope="session")
def litemedsam_auto():
    """LiteMedSAM as a run gets it by default (``sam.runtime: auto``: OpenVINO on the CPU), for tests of
    what is built on SAM rather than of SAM: the same masks as torch (test_cpu_runtime.py), in two
    thirds of the time."""
    from medclipsam.models.sam_backends import build_segmenter

    return build_segmenter("litemedsam", runtime="auto")


@pytest.fixture(scope="session")
def s3_switch():
    """A real S3-compatible server (moto in server mode) on loopback that a test can stop, restart or
    make answer 503 (``tests/s3_switch.py``); every S3 test in the process shares it."""
    from s3_switch import SwitchableS3

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[key] = value
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = SwitchableS3()
    server.start()
    endpoint = server.endpoint
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    import fsspec

    fsspec.config.conf.setdefault("s3", {})["client_kwargs"] = {"endpoint_url": endpoint}
    yield server
    fsspec.config.conf.get("s3", {}).pop("client_kwargs", None)
    server.stop()


@pytest.fixture(scope="session")
def s3_server(s3_switch):
    """The S3 server's endpoint URL."""
    return s3_switch.endpoint


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields ``s3://name``."""
    import uuid

    import s3fs

    name = f"bucket-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"



@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1: sqlite backend, artifacts on the moto S3 server (proxied).

    The S3 secret and the MLflow tracking password are marker strings (``SECRET_MARKERS``), so tests
    can check that neither reaches a log, a manifest, run.json or an MLflow record. Yields
    ``(tracking_uri, artifacts_uri, log_path)``.
    """
    import boto3
    from mlflow_server import running_mlflow_server
    from registry_models import SECRET_MARKERS

    os.environ.update(SECRET_MARKERS)
    os.environ["MLFLOW_TRACKING_USERNAME"] = "medclipsam-tests"
    bucket = "mlflow-artifacts"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    root = tmp_path_factory.mktemp("mlflow-server")
    log_path = root / "server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    options = ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", f"s3://{bucket}/mlflow"]
    with running_mlflow_server(options, env, log_path) as uri:
        yield uri, f"s3://{bucket}/mlflow", log_path
