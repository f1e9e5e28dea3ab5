"""Nothing runs from a model file, weights are used only when their hash matches, and no credential
in a URI reaches an output, a log line or MLflow.

The planted checkpoints pickle a call of ``os.system`` that would create a marker file: the marker
must stay absent whatever the loader is (a SAM checkpoint, an ensemble member, a Ray Train
training state), and each refusal is a sentence naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from medclipsam.cli import main
from medclipsam.errors import InputError, ModelError
from medclipsam.models import checkpoints
from medclipsam.models.checkpoints import UnsafeCheckpoint, load_state_dict, read_torch_checkpoint
from medclipsam.storage import fetch, redact_text, redact_uri
from medclipsam.weak import ensemble, training
from medclipsam.weak.ensemble import ENSEMBLE_FILE, FINAL

SECRETS = ("pw-marker-91e3", "token-marker-4c7a", "sig-marker-0b2d")


class Planted:
    """Pickles as ``os.system("touch MARKER")``: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _planted_state(path: Path, marker: Path, **state) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**state, "planted": Planted(marker)}, path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_planted_checkpoint_would_run_if_unpickled(tmp_path):
    """The control: the same file loaded the unsafe way does run the command."""
    marker = tmp_path / "ran"
    path = _planted_state(tmp_path / "evil.pth", marker, model={"w": torch.zeros(2)})
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_planted_sam_checkpoint_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = _planted_state(tmp_path / "evil.pth", marker, model={"w": torch.zeros(2)})
    with pytest.raises(UnsafeCheckpoint, match=rf"checkpoint file {path}: refused.*posix.system"):
        load_state_dict(str(path))
    assert not marker.exists()


def test_a_planted_training_state_is_refused_not_skipped(tmp_path):
    """A Ray Train checkpoint that would run code stops the resume (an older one is not tried: the
    planted file is someone's doing, not a crash)."""
    from ray.train import Checkpoint

    marker = tmp_path / "ran"
    run = tmp_path / "ray_train" / "weak"
    older = run / "checkpoint_2026-01-01_00-00-00.000000"
    newer = run / "checkpoint_2026-01-01_00-00-01.000000"
    torch.save({"network_weights": {}, "optimizer_state": {}, "grad_scaler_state": None, "logging": {},
                "_best_ema": None, "current_epoch": 3, "init_args": {}}, _mkdir(older) / training.RESUME_STATE)
    _planted_state(newer / training.RESUME_STATE, marker, network_weights={}, optimizer_state={},
                   grad_scaler_state=None, logging={}, _best_ema=None, current_epoch=4, init_args={})

    class Trainer:
        device = torch.device("cpu")

        def load_checkpoint(self, state):
            self.current_epoch = state["current_epoch"]

    with pytest.raises(UnsafeCheckpoint, match=rf"{newer}/{training.RESUME_STATE}: refused"):
        checkpoints.restore_newest(Checkpoint(str(newer)), lambda folder: training.resume_from(Trainer(), folder))
    assert not marker.exists()


def test_a_real_nnunet_style_state_still_loads(tmp_path):
    """What nnU-Net's checkpoints hold besides tensors (numpy floats in its log, a torch.device, tuples)."""
    path = tmp_path / "state.pth"
    state = {"network_weights": {"w": torch.arange(4.0)}, "logging": {"mean_fg_dice": [np.float64(0.5)],
                                                                      "ema_fg_dice": [np.float32(0.25)]},
             "_best_ema": np.float64(0.75), "current_epoch": np.int64(7),
             "init_args": {"device": torch.device("cpu"), "fold": "all", "plans": {"a": [1, 2]}},
             "inference_allowed_mirroring_axes": (0, 1)}
    torch.save(state, path)
    loaded = read_torch_checkpoint(path, ("network_weights", "logging"))
    assert torch.equal(loaded["network_weights"]["w"], torch.arange(4.0))
    assert loaded["logging"]["mean_fg_dice"] == [0.5] and loaded["_best_ema"] == 0.75
    assert loaded["init_args"]["device"] == torch.device("cpu") and loaded["inference_allowed_mirroring_axes"] == (0, 1)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ensemble(root: Path, marker: Path | None = None) -> Path:
    """An ensemble folder whose ensemble.json records the right hashes (a planted member passes the
    hash check: only the loader can stop it)."""
    folder = root / "ensemble"
    member = folder / "fold_all" / "checkpoint_epoch0001.pth"
    state = {"network_weights": {"w": torch.full((4,), 1.5)}, "current_epoch": 1}
    if marker is None:
        _mkdir(member.parent)
        torch.save(state, member)
    else:
        _planted_state(member, marker, **state)
    torch.save(state, folder / "fold_all" / FINAL)
    (folder / ENSEMBLE_FILE).write_text(json.dumps({"members": [member.name], "final": FINAL,
                                                    "sha256": {n: _sha(folder / "fold_all" / n)
                                                               for n in (member.name, FINAL)}}))
    return folder


def _png_cohort(folder: Path) -> Path:
    _mkdir(folder)
    image = np.tile(np.arange(32, dtype=np.uint8) * 2, (32, 1))
    image[6:20, 8:22] = 220
    sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / "c1.png"))
    return folder


def test_weak_predict_refuses_a_planted_member_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    folder = _ensemble(tmp_path, marker)
    result = CliRunner().invoke(main, ["weak", "predict", "--model", str(folder), "--input",
                                       str(_png_cohort(tmp_path / "in")), "--output", str(tmp_path / "out"),
                                       "--local"])
    assert result.exit_code == 2, result.output  # a model that cannot be used, as for any ModelError
    line = result.output.strip().splitlines()[-1]
    member = folder / "fold_all" / "checkpoint_epoch0001.pth"
    assert line.startswith(f"error: weak ensemble {folder}: checkpoint file {member}: refused"), line
    assert "Traceback" not in result.output and not marker.exists()


def test_a_tampered_member_is_refused_before_it_is_loaded(tmp_path, monkeypatch):
    folder = _ensemble(tmp_path)
    ensemble.resolve_ensemble(str(folder))
    member = folder / "fold_all" / "checkpoint_epoch0001.pth"
    one_and_a_half = struct.pack("<f", 1.5)
    data = member.read_bytes()
    assert data.count(one_and_a_half * 4) == 1
    member.write_bytes(data.replace(one_and_a_half * 4, struct.pack("<f", 2.5) + one_and_a_half * 3))
    assert checkpoints.torch_file_problem(member) is None  # still a complete file: only its hash tells
    loads = []
    monkeypatch.setattr(checkpoints, "load_torch_file", lambda *a, **k: loads.append(a))
    with pytest.raises(ModelError, match=rf"{member} has a SHA-256 other than the one ensemble.json recorded"):
        ensemble.resolve_ensemble(str(folder))
    assert loads == []


@pytest.fixture()
def http_files(tmp_path):
    """A plain HTTP server on loopback serving ``tmp_path/served`` (credentials and queries ignored)."""
    served = _mkdir(tmp_path / "served")
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that hangs up early (a HEAD-like probe)
        pass


@pytest.fixture()
def insecure_allowed(monkeypatch, tmp_path):
    monkeypatch.setenv(fetch.INSECURE_ENV, "1")
    monkeypatch.setattr(fetch, "CACHE_DIR", tmp_path / "cache")


def test_plain_http_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.INSECURE_ENV, "0")  # and restored after: the flag below sets it to 1
    with pytest.raises(InputError, match=r"plain http:// is refused.*--allow-insecure-download"):
        fetch.fetch_file("http://127.0.0.1:9/x.pth", "checkpoint")
    images = _png_cohort(tmp_path / "in")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("case_id,slice,x0,y0,x1,y1\nc1,,4,4,20,20\n")
    args = ["segment", "--input", str(images), "--boxes", str(boxes), "--output", str(tmp_path / "out"),
            "--checkpoint", f"http://user:{SECRETS[0]}@127.0.0.1:9/lite.pth"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("error: SAM checkpoint http://user:***@127.0.0.1:9/lite.pth: plain http:// is "
                                     "refused (the weights could be replaced on the way); use https://, or pass "
                                     "--allow-insecure-download")
    assert not (tmp_path / "out").exists()
    allowed = CliRunner().invoke(main, ["--allow-insecure-download", *args])
    assert allowed.exit_code == 2 and "no such object" in allowed.output  # now it tries (nothing listens on port 9)
    assert SECRETS[0] not in allowed.output


def test_a_cached_file_changed_in_the_cache_is_fetched_again(http_files, insecure_allowed):
    served, host = http_files
    (served / "w.pth").write_bytes(b"weights v1")
    uri = f"http://{host}/w.pth"
    path = Path(fetch.fetch_file(uri))
    assert path.read_bytes() == b"weights v1"
    path.write_bytes(b"tampered!!")  # same size
    assert Path(fetch.fetch_file(uri)).read_bytes() == b"weights v1"  # the cached copy was not trusted


def test_a_pinned_hash_is_checked_locally_remotely_and_in_the_cache(http_files, insecure_allowed, tmp_path):
    served, host = http_files
    (served / "w.pth").write_bytes(b"weights v1")
    good, bad = hashlib.sha256(b"weights v1").hexdigest(), hashlib.sha256(b"other").hexdigest()
    assert Path(fetch.fetch_file(f"http://{host}/w.pth#sha256={good}")).read_bytes() == b"weights v1"
    with pytest.raises(ModelError, match=r"SHA-256 is [0-9a-f]{12}\.\.\., not the pinned [0-9a-f]{12}\.\.\.; refused"):
        fetch.fetch_file(f"http://{host}/w.pth#sha256={bad}")
    (served / "w.pth").write_bytes(b"weights v2")  # the server's copy changed: a pinned fetch refuses it
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ModelError, match="not the pinned"):
        fetch.fetch_file(f"http://{host}/w.pth#sha256={good}")
    local = tmp_path / "local.pth"
    local.write_bytes(b"weights v1")
    assert fetch.fetch_file(f"{local}#sha256={good}") == str(local)
    with pytest.raises(ModelError, match=rf"{local}: its SHA-256 is not the pinned"):
        fetch.fetch_file(f"{local}#sha256={bad}")
    with pytest.raises(InputError, match="64 hexadecimal digits"):
        fetch.fetch_file(f"{local}#sha256=abc")


def test_a_registered_version_is_used_only_if_its_hash_tag_matches(tiny_clip_dir, tracking_uri, tmp_path,
                                                                   monkeypatch):
    from registry_models import register_clip

    from medclipsam.models.biomedclip import _registered_dir

    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts go to ./mlruns
    monkeypatch.setattr(fetch, "CACHE_DIR", tmp_path / "cache")
    version = register_clip(Path(tiny_clip_dir), "tiny", tracking_uri)
    weights = "open_clip_pytorch_model.bin"
    original = (Path(tiny_clip_dir) / weights).read_bytes()
    cached = _registered_dir(f"models:/tiny/{version}") / weights
    assert cached.read_bytes() == original
    cached.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one byte changed in the cache
    assert (_registered_dir(f"models:/tiny/{version}") / weights).read_bytes() == original  # fetched again
    stored = [p for p in (tmp_path / "mlruns").rglob(weights)]
    assert stored
    for path in stored:  # the artifact store itself tampered with: refused
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    cached.write_bytes(b"")
    with pytest.raises(ModelError, match=rf"models:/tiny/{version}: the weights fetched from the registry have "
                                         r"SHA-256 .* but version .* was registered with .*refused"):
        _registered_dir(f"models:/tiny/{version}")


@pytest.mark.parametrize("uri, shown", [
    ("https://user:pass@host/x.pth", "https://user:***@host/x.pth"),
    ("https://ghp_TOKEN@host/x.pth", "https://***@host/x.pth"),
    ("https://host/x.pth?token=T&v=1", "https://host/x.pth?token=***&v=1"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=A&X-Amz-Credential=C&X-Amz-Security-Token=S&X-Amz-Signature=G",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=A&X-Amz-Credential=***&X-Amz-Security-Token=***"
     "&X-Amz-Signature=***"),
    ("https://acct.blob.core.windows.net/c/b?sv=2022&sig=S", "https://acct.blob.core.windows.net/c/b?sv=2022&sig=***"),
    ("https://host/x?api_key=K#sha256=00", "https://host/x?api_key=***#sha256=00"),
    ("s3://bucket/prefix/x.pth", "s3://bucket/prefix/x.pth"),
    ("/data/x.pth", "/data/x.pth"),
    ("models:/name@champion", "models:/name@champion"),
])
def test_redaction(uri, shown):
    assert redact_uri(uri) == shown
    assert redact_text(f"checkpoint '{uri}' failed") == f"checkpoint '{shown}' failed"
    # the sentence's own punctuation after a bare URI is kept, not taken for part of a secret
    sentence = "checkpoint {}: no such file, see {}."
    assert redact_text(sentence.format(uri, uri)) == sentence.format(shown, shown)


def _files_holding(root: Path, secrets: tuple[str, ...]) -> list[str]:
    """Every file under ``root`` whose name or content holds a secret."""
    found = []
    for path in root.rglob("*"):
        found += [f"{path} (its name)" for s in secrets if s in str(path.relative_to(root))]
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


def test_no_secret_in_any_output_log_or_mlflow_entry(http_files, insecure_allowed, tmp_path, tracking_uri,
                                                      monkeypatch, caplog):
    """A credential in the URI of the checkpoint (a user's password, and a token and a signature in its
    query), a full ``pseudolabel`` run on Ray (tracked in MLflow) and a failing one: every file
    written (masks, records, manifest, run.json, report, the model cache), the MLflow store (its
    database and artifacts), Ray's session folder (its logs), stdout, stderr (with -v) and the log
    are searched for the secrets."""
    import tempfile

    from medclipsam.models.sam_backends import BACKENDS

    served, host = http_files
    shutil.copy(BACKENDS["litemedsam"].default_checkpoint(), served / "lite.pth")
    checkpoint = (f"http://user:{SECRETS[0]}@{host}/lite.pth?token={SECRETS[1]}&X-Amz-Signature={SECRETS[2]}"
                  "&v=1")
    images = _png_cohort(tmp_path / "in")
    labels = _mkdir(tmp_path / "labels")
    truth = np.zeros((32, 32), np.uint8)
    truth[6:20, 8:22] = 1
    sitk.WriteImage(sitk.GetImageFromArray(truth), str(labels / "c1.png"))
    ray_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths have a length limit
    monkeypatch.setenv("RAY_TMPDIR", ray_dir)
    monkeypatch.setenv("MEDCLIPSAM_CACHE", str(tmp_path / "cache"))  # Ray's workers fetch the checkpoint too
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = ["pseudolabel", "--input", str(images), "--gt", str(labels), "--prompt-source", "labels",
            "--tracking-uri", tracking_uri, "--checkpoint"]
    try:
        with caplog.at_level("DEBUG"):
            result = CliRunner().invoke(main, ["-v", *args, checkpoint, "--output", str(out)])
            failed = CliRunner().invoke(main, ["-v", *args, checkpoint.replace("lite.pth", "absent.pth"),
                                               "--output", str(tmp_path / "out2")])
        assert result.exit_code == 0, result.output
        assert "1 case(s): ok=1" in result.output
        record = json.loads((out / "records" / "c1.json").read_text())
        assert f"http://user:***@{host}/lite.pth?token=***&X-Amz-Signature=***&v=1" in record["parameters"]
        # the actors fail to load it (exit 1); the -v traceback and Ray's worker logs name the URI, redacted
        assert failed.exit_code == 1 and f"http://user:***@{host}/absent.pth?token=***" in failed.output
        leaks = _files_holding(tmp_path, SECRETS) + _files_holding(Path(ray_dir), SECRETS)
        leaks += [f"output: {s}" for s in SECRETS if s in result.output + failed.output]
        leaks += [f"log: {s}" for s in SECRETS if s in caplog.text]
        assert leaks == []
        assert (tmp_path / "mlflow.db").exists() and any((tmp_path / "mlruns").rglob("*.parquet"))
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_the_basic_auth_mlflow_server_of_deploy_refuses_anonymous_clients(tmp_path, monkeypatch):
    """MLflow's basic-auth app, configured as deploy/mlflow.yaml and docs/clusters.md say (an ini
    through MLFLOW_AUTH_CONFIG_PATH, a signing key): an anonymous request is refused, the account in
    MLFLOW_TRACKING_USERNAME/PASSWORD gets in, a wrong password is one sentence, and the password
    appears in no output."""
    import urllib.error
    import urllib.request

    from mlflow_server import running_mlflow_server

    password = "mlflow-admin-marker-77d1"
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'basic_auth.db'}\n"
                   f"admin_username = admin\nadmin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32}
    options = ["--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    with running_mlflow_server(options, env, tmp_path / "server.log", cwd=tmp_path) as uri:
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/registered-models/search", timeout=10)
        assert anonymous.value.code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        allowed = CliRunner().invoke(main, ["models", "list", "--tracking-uri", uri])
        assert allowed.exit_code == 0, allowed.output
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-" + password)
        refused = CliRunner().invoke(main, ["models", "list", "--tracking-uri", uri])
        assert refused.exit_code != 0 and refused.output.startswith("error: ") and "Traceback" not in refused.output
        assert password not in allowed.output + refused.output
