"""Shard download throughput: local storage vs S3 proxied through the API vs a presigned redirect.

One 64 MiB job shard, downloaded whole by the client's HTTP stack (httpx, following redirects)
from the real app served by uvicorn on loopback. S3 is moto's server on loopback (the same
endpoint the tests use), so the figures compare the paths through the service, not a network.

    python -m bench.bench_download [--mib 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pyarrow as pa
import uvicorn


def serve(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def start_moto() -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    return os.environ["AWS_ENDPOINT_URL"]


def one_mode(mode: str, mib: int, repeat: int) -> dict:
    import boto3

    from bench.common import bench_key, scratch_runtime
    from service.http.app import create_app
    from service.ids import new_id
    from service.models import Job, Shard

    uri, download = None, "proxy"
    if mode != "local":
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        uri, download = f"s3://{bucket}/shards", "redirect" if mode == "s3-presigned" else "proxy"
    with tempfile.TemporaryDirectory() as state, scratch_runtime(Path(state), storage_uri=uri,
                                                                 storage_download=download) as rt:
        key = bench_key(rt)
        job_id = new_id("job")
        stored = rt.storage.write_table(f"jobs/{job_id}/part-00000.parquet",
                                        pa.table({"payload": [os.urandom(1 << 20) for _ in range(mib)]}), {})
        shard_id = new_id("shard")
        with rt.sessions() as db, db.begin():
            db.add(Job(id=job_id, tenant="bench", status="succeeded", teacher="t", mode="generate", top_logprobs=0,
                       sampling={}, cache_policy="use", metadata_={}, total=0, body_sha256=""))
            db.flush()
            db.add(Shard(id=shard_id, kind="job", job_id=job_id, shard_index=0, path=stored.path, rows=stored.rows,
                         bytes=stored.bytes, sha256=stored.sha256))
        url, server, thread = serve(create_app(rt))
        seconds = []
        with httpx.Client(follow_redirects=True, timeout=120) as client:
            for _ in range(repeat + 1):  # the first download also hashes the object once (proxy)
                digest, started = hashlib.sha256(), time.perf_counter()
                headers = {"Authorization": f"Bearer {key}"}
                with client.stream("GET", f"{url}/v1/shards/{shard_id}", headers=headers) as response:
                    response.raise_for_status()
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                seconds.append(time.perf_counter() - started)
                assert digest.hexdigest() == stored.sha256
        server.should_exit = True
        thread.join(30)
    best = min(seconds[1:])
    return {"storage": mode, "mib": stored.bytes / 2**20, "first_s": seconds[0], "best_s": best,
            "mib_per_s": stored.bytes / 2**20 / best}


def main() -> None:
    from bench.common import report

    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    start_moto()
    rows = [one_mode(mode, args.mib, args.repeat) for mode in ("local", "s3-proxy", "s3-presigned")]
    report("shard download throughput (loopback)", rows, "download.json", {"args": vars(args)})


if __name__ == "__main__":
    main()
