"""Writing small outputs to S3: one PUT against the temporary-name-and-rename path it replaced.

What runs: a moto S3 server on loopback (the tests' switchable server, ``tests/s3_switch.py``) and
``--files`` small objects (``--size`` bytes each, about a PNG mask's size) written through
``storage.write_bytes_atomic`` into one prefix, twice in one process, alternating in rounds so that
drift in the machine's load hits both alike:

- ``rename``: the write as it was, for a filesystem without atomic uploads: a folder check, the
  data under a temporary name, then ``mv`` (a copy and a delete; s3fs adds folder probes);
- ``put``: the write on an object store now: the folder check, then one PUT.

Both are the same function; the baseline is selected by making ``_puts_whole_objects`` answer
False. Counted: the HTTP requests the server answered per write. Timed: seconds per write (median of
the rounds). The last line: ``requests_rename=<n> requests_put=<n> ms_rename=<v> ms_put=<v> speedup=<x>``.

    python benchmarks/s3_writes.py [--files 200] [--size 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--size", type=int, default=2000, help="bytes per object")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[key] = value
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from s3_switch import SwitchableS3  # the tests' moto server

    server = SwitchableS3()
    server.start()
    import fsspec
    import s3fs

    fsspec.config.conf.setdefault("s3", {})["client_kwargs"] = {"endpoint_url": server.endpoint}
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint}).mkdir("bench")
    from medclipsam import storage

    whole_objects = storage._puts_whole_objects
    payload = os.urandom(args.size)
    seconds: dict[str, list[float]] = {"rename": [], "put": []}
    requests: dict[str, int] = {"rename": 0, "put": 0}
    for round_ in range(args.rounds):
        for mode in ("rename", "put") if round_ % 2 == 0 else ("put", "rename"):
            storage._puts_whole_objects = whole_objects if mode == "put" else (lambda fs: False)
            before = len(server.requests)
            start = time.perf_counter()
            for i in range(args.files):
                storage.write_bytes_atomic(f"s3://bench/{mode}/r{round_}/masks/c{i:05d}.png", payload)
            seconds[mode].append((time.perf_counter() - start) / args.files)
            requests[mode] += len(server.requests) - before
    storage._puts_whole_objects = whole_objects
    per_write = {mode: requests[mode] / (args.files * args.rounds) for mode in requests}
    ms = {mode: 1000 * statistics.median(values) for mode, values in seconds.items()}
    check = storage.read_bytes(f"s3://bench/put/r0/masks/c{args.files - 1:05d}.png") == payload
    server.stop()
    print(f"files={args.files} size={args.size} rounds={args.rounds} content_ok={check} "
          f"ms_rename_by_round={','.join(f'{1000 * v:.2f}' for v in seconds['rename'])} "
          f"ms_put_by_round={','.join(f'{1000 * v:.2f}' for v in seconds['put'])}")
    print(f"requests_rename={per_write['rename']:.1f} requests_put={per_write['put']:.1f} "
          f"ms_rename={ms['rename']:.2f} ms_put={ms['put']:.2f} speedup={ms['rename'] / ms['put']:.2f}")


if __name__ == "__main__":
    main()
