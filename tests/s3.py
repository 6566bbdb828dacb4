"""A real S3 HTTP endpoint on loopback: moto's server mode, as s3fs's own tests use it.

The service is pointed at it the way an operator points it at MinIO or R2: the standard AWS
environment variables and `TEACHERCACHE_STORAGE_URI=s3://bucket/prefix`.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Server:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"tc-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        return [o["Key"] for o in self.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def start_s3_server():
    """(server, stop): moto on a free loopback port, with the environment pointing at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})

    def stop() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()

    return S3Server(endpoint), stop


def local_or_s3_uri(request) -> str | None:
    """The body of a `storage_uri` fixture parametrized over both adapters: None is local."""
    if request.param == "local":
        return None
    return f"s3://{request.getfixturevalue('s3_server').new_bucket()}/shards"
