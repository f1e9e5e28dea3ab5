"""Shared fixtures: the real sample volumes, the real LiteMedSAM weights, a moto S3 server."""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def samples_root():
    """The pyradiomics-bhklab sample cohort (fetched through pip once, then cached)."""
    from medclipsam.samples import fetch_samples

    return fetch_samples()


@pytest.fixture(scope="session")
def litemedsam():
    from medclipsam.models.sam_backends import build_segmenter

    return build_segmenter("litemedsam")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[key] = value
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    import fsspec

    fsspec.config.conf.setdefault("s3", {})["client_kwargs"] = {"endpoint_url": endpoint}
    yield endpoint
    fsspec.config.conf.get("s3", {}).pop("client_kwargs", None)
    server.stop()


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
