"""The storage layer rides out an object-store outage: against the moto server on loopback taken down
or answering 503, reads and writes are retried with growing, jittered delays until they succeed, or
until the budget is spent and one sentence says so; what the store refuses (no such key) is not
retried, and the first contact with an input (``fail_fast``) reports an unreachable store at once.

botocore's own retries are turned off here (one attempt per try), so what rides out the outage is
this package's retry layer and nothing else.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from medclipsam import storage
from medclipsam.errors import InputError, StorageUnavailable
from medclipsam.storage import retry
from medclipsam.storage.access import reading


@pytest.fixture()
def store(s3_switch, s3_bucket, monkeypatch):
    """The switchable server, a bucket on it, one botocore attempt per call, a 20 s retry budget."""
    import fsspec
    import s3fs

    conf = {**fsspec.config.conf.get("s3", {}), "config_kwargs": {"retries": {"max_attempts": 1}}}
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    monkeypatch.setenv(retry.RETRY_SECONDS_ENV, "20")
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_switch, s3_bucket
    s3_switch.unavailable_until, s3_switch.pending_window = 0.0, None
    if s3_switch.is_refusing():
        s3_switch.start()
    s3fs.S3FileSystem.clear_instance_cache()


def _down_for(server, seconds: float) -> threading.Thread:
    server.stop()
    assert server.is_refusing()
    thread = threading.Thread(target=lambda: (time.sleep(seconds), server.start()), daemon=True)
    thread.start()
    return thread


def test_reads_and_writes_ride_out_503s(store, caplog):
    server, bucket = store
    storage.write_bytes_atomic(f"{bucket}/a.bin", b"before")
    served = server.answered_503
    server.unavailable(2.5, from_next_request=True)
    begin = time.monotonic()
    storage.write_bytes_atomic(f"{bucket}/b.bin", b"during")
    assert storage.read_bytes(f"{bucket}/a.bin") == b"before"
    assert time.monotonic() - begin >= 2.0  # it waited the window out
    assert server.answered_503 - served >= 2  # more than one try was refused
    assert storage.read_bytes(f"{bucket}/b.bin") == b"during"
    assert [p for p in storage.list_files(bucket) if ".tmp-" in p] == []  # no temporary left behind
    assert "the object store did not answer" in caplog.text and "retrying for up to 20 s" in caplog.text


def test_a_store_that_goes_down_and_comes_back(store):
    server, bucket = store
    storage.write_bytes_atomic(f"{bucket}/c.bin", b"kept")
    returned = _down_for(server, 2.0)
    assert storage.read_bytes(f"{bucket}/c.bin") == b"kept"  # objects survive the restart
    storage.write_bytes_atomic(f"{bucket}/d.bin", b"after")
    returned.join()
    assert storage.read_bytes(f"{bucket}/d.bin") == b"after"
    assert storage.exists(f"{bucket}/c.bin") and not storage.exists(f"{bucket}/nothing.bin")


def test_an_outage_longer_than_the_budget_is_one_sentence(store, monkeypatch):
    server, bucket = store
    monkeypatch.setenv(retry.RETRY_SECONDS_ENV, "2")
    returned = _down_for(server, 6.0)
    begin = time.monotonic()
    with pytest.raises(StorageUnavailable) as caught:
        storage.read_bytes(f"{bucket}/c.bin")
    took = time.monotonic() - begin
    message = str(caught.value)
    assert message.startswith(f"{bucket}/c.bin: the object store did not answer (")
    # a loaded machine can spend the whole budget on one try: the count is not the point
    assert re.search(r"\(\d+ tr(?:y|ies) over \d+ s; last: EndpointConnectionError: Could not", message)
    assert "\n" not in message and caught.value.exit_code == 1
    assert 1.0 <= took < 5.5  # about the budget, not the whole 6 s outage (a slow last try may overrun it)
    returned.join()


def test_what_the_store_refuses_is_not_retried(store, caplog):
    server, bucket = store
    server.requests.clear()
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{bucket}/never-written.bin")
    asked = [r for r in server.requests if "never-written.bin" in r]
    assert 1 <= len(asked) <= 2, asked  # one try (s3fs may look for a folder of that name too)
    assert "retrying" not in caplog.text


def test_first_contact_fails_fast(store, caplog):
    server, bucket = store
    returned = _down_for(server, 3.0)
    try:
        with pytest.raises(InputError, match=r"the cohort cannot be read \(EndpointConnectionError"):
            with reading(f"{bucket}/cohort", "cohort"):
                storage.list_files(f"{bucket}/cohort")
        assert "retrying" not in caplog.text  # not one retry of ours (the budget is 20 s)
        assert not returned.is_alive() or server.is_refusing()  # it failed while the store was down
    finally:
        returned.join()


def test_backoff_doubles_with_jitter_and_stops_within_the_budget(monkeypatch):
    clock = [0.0]
    delays: list[float] = []

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(retry.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv(retry.RETRY_SECONDS_ENV, "60")
    calls = []

    def refused() -> None:
        calls.append(clock[0])
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(StorageUnavailable, match=r"^s3://b/k: the object store did not answer \(\d+ tries over"):
        retry.retrying("s3://b/k", refused, sleep=sleep)
    assert len(calls) == len(delays) + 1
    for n, delay in enumerate(delays[:-1]):
        nominal = min(retry.MAX_DELAY_S, retry.FIRST_DELAY_S * 2**n)
        assert 0.5 * nominal <= delay <= nominal
    assert 0 < delays[-1] <= retry.MAX_DELAY_S  # cut to end with the budget
    assert max(delays) > 0.5 * retry.MAX_DELAY_S  # it reached the cap
    assert sum(delays) == pytest.approx(60.0)  # the whole budget is used, and no more
    assert calls[-1] == pytest.approx(60.0)  # the last try comes when the budget ends


def test_the_budget_setting_is_checked(monkeypatch):
    monkeypatch.setenv(retry.RETRY_SECONDS_ENV, "soon")
    expected = r"^MEDCLIPSAM_STORAGE_RETRY_SECONDS must be a number of seconds of at least 0, got 'soon'$"
    with pytest.raises(InputError, match=expected):
        retry.retry_budget()
    monkeypatch.setenv(retry.RETRY_SECONDS_ENV, "-1")
    with pytest.raises(InputError, match="of at least 0, got '-1'"):
        retry.retry_budget()
    monkeypatch.delenv(retry.RETRY_SECONDS_ENV)
    assert retry.retry_budget() == retry.DEFAULT_RETRY_SECONDS


def test_transient_failures_are_told_from_refusals():
    from botocore.exceptions import ClientError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")

    def wrapped(cause: BaseException) -> OSError:  # as s3fs hands a ClientError on
        try:
            raise OSError(5, "wrapped") from cause
        except OSError as exc:
            return exc

    def raised_while_handling(handled: BaseException, raised: BaseException) -> BaseException:
        try:
            try:
                raise handled
            except type(handled):
                raise raised  # noqa: B904 -- the context is the point here
        except type(raised) as exc:
            return exc

    assert retry.is_transient(wrapped(client_error(503, "ServiceUnavailable")))
    assert retry.is_transient(client_error(408, "RequestTimeout"))
    assert not retry.is_transient(client_error(501, "NotImplemented"))
    # s3fs reopens an object inside its handler of a dropped connection: a 404 there is a refusal
    assert not retry.is_transient(raised_while_handling(ConnectionResetError(), FileNotFoundError("s3://b/k")))
    assert retry.is_transient(raised_while_handling(ValueError(), ConnectionResetError()))
    assert not retry.is_transient(StorageUnavailable("s3://b/k: already retried"))
    assert retry.is_transient(client_error(500, "InternalError"))
    assert retry.is_transient(client_error(400, "SlowDown"))
    assert retry.is_transient(client_error(429, "TooManyRequests"))
    assert retry.is_transient(ConnectionResetError())
    assert not retry.is_transient(wrapped(client_error(403, "AccessDenied")))
    assert not retry.is_transient(client_error(404, "NoSuchKey"))
    assert not retry.is_transient(FileNotFoundError("s3://b/k"))
    assert not retry.is_transient(ValueError("bad"))


def test_temporaries_left_by_an_outage_are_removed(tmp_path):
    """On a filesystem that writes through a temporary and a rename, a cut-short write's temporary
    is cleared at the next run start and nothing else is touched."""
    run = tmp_path / "run"
    storage.write_bytes_atomic(f"{run}/masks/c1.png", b"mask")
    (run / "masks" / f"{storage.TEMPORARY_PREFIX}0123-c2.png").write_bytes(b"half")  # as a cut-short write leaves it
    (run / "records").mkdir()
    (run / "records" / f"{storage.TEMPORARY_PREFIX}4567-c2.json").write_bytes(b"{")
    assert storage.remove_temporaries(str(run)) == 2
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == ["masks/c1.png"]
    assert storage.remove_temporaries(str(tmp_path / "absent")) == 0


def test_an_object_store_output_is_not_listed_for_temporaries(store):
    """A write to an object store is one PUT and leaves no temporary: a run start costs no request
    there (a cohort's output can hold millions of keys), and no object is deleted."""
    server, bucket = store
    name = f"{bucket}/run/masks/{storage.TEMPORARY_PREFIX}0123-c2.png"
    storage.write_bytes_atomic(name, b"a user's own object")
    server.requests.clear()
    assert storage.remove_temporaries(f"{bucket}/run") == 0
    assert server.requests == []
    assert storage.read_bytes(name) == b"a user's own object"


def test_a_case_that_met_an_outage_stops_the_run():
    retry.stop_on_outage("c1", "slice 0 could not be written: FileNotFoundError: s3://b/x", "s3://b/run", 3)  # no
    with pytest.raises(StorageUnavailable) as caught:
        retry.stop_on_outage("c2", f"s3://b/run/masks/c2.png: {retry.OUTAGE} (4 tries over 9 s; last: ...)",
                             "s3://b/run", 3)
    assert str(caught.value) == (
        f"the run stopped: case c2: s3://b/run/masks/c2.png: {retry.OUTAGE} (4 tries over 9 s; last: ...). "
        "The 3 finished cases are kept under s3://b/run; run the same command again to resume once the store answers")


def test_an_object_store_write_is_one_put(store):
    """A PUT is atomic on S3: no temporary object, no copy, no delete; one listing for the folder check."""
    server, bucket = store
    storage.write_bytes_atomic(f"{bucket}/run/masks/c0.png", b"first")
    server.requests.clear()
    storage.write_bytes_atomic(f"{bucket}/run/masks/c1.png", b"second")
    storage.write_bytes_atomic(f"{bucket}/run/masks/c0.png", b"replaced")
    name = bucket.removeprefix("s3://")
    puts = [r for r in server.requests if r.startswith("PUT ")]
    assert puts == [f"PUT /{name}/run/masks/c1.png", f"PUT /{name}/run/masks/c0.png"]
    assert len(server.requests) == 4 and not any(".tmp-" in r for r in server.requests), server.requests
    assert storage.read_bytes(f"{bucket}/run/masks/c0.png") == b"replaced"
