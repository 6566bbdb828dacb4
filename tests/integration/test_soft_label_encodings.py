"""A job's soft-label encoding end to end with the scripted engine and a real Postgres: the same
requests asked for as float32, float16 and compact are computed once (the cache keeps float32),
each job's shards name their encoding and schema version, and the client's readers decode them
into the same arrays, within each encoding's bound."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import teachercache as tc
from teachercache.shard_format import JOB_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY
from teachercache.soft_labels import SOFT_LABELS_KEY, STEP, decode_table
from teachercache.testing import SyncASGITransport
from tests.jobs import download_rows, wait_for
from workers.scripted_engine import ScriptedEngine

TEACHER = "smollm2-135m-instruct"


def batch(encoding: str | None) -> dict:
    body = {"teacher": TEACHER, "top_logprobs": 5, "sampling": {"max_tokens": 12},
            "requests": [{"custom_id": f"r{i}", "prompt_token_ids": [3, 4, 5, i]} for i in range(6)]}
    if encoding is not None:
        body["soft_labels"] = {"encoding": encoding}
    return body


def shard_tables(api, job: dict) -> list:
    return [pq.read_table(io.BytesIO(api.get(s["url"]).content)) for s in job["shards"]]


def flat(rows: list[dict], column: str) -> np.ndarray:
    values = [v for r in rows for p in r[column] for v in (p if isinstance(p, list) else [p])]
    return np.array(values, dtype=np.float64)


def test_every_encoding_is_derived_from_one_computation_and_decodes_to_the_same_arrays(api, app, api_key,
                                                                                        start_worker):
    start_worker(ScriptedEngine())
    exact_job = wait_for(api, api.post("/v1/jobs", json=batch(None)).json()["id"])
    assert exact_job["soft_labels"] == {"encoding": "float32"}
    exact = download_rows(api, exact_job)
    client = tc.Client("http://testserver", api_key=api_key, transport=SyncASGITransport(app))
    for encoding, bound in (("float32", 0.0), ("float16", 2.0**-11 * 64), ("compact", STEP / 2 + 2.0**-8)):
        job = wait_for(api, api.post("/v1/jobs", json=batch(encoding)).json()["id"])
        assert job["status"] == "succeeded" and job["soft_labels"] == {"encoding": encoding}
        assert job["counts"]["cached"] == 6  # a more or less exact encoding never recomputes
        for table in shard_tables(api, job):
            # compact (layout 2) raises the version, so readers from before it ask for an upgrade
            version = "3" if encoding == "compact" else SCHEMA_VERSION
            assert table.schema.metadata[SCHEMA_VERSION_KEY] == version.encode()
            assert json.loads(table.schema.metadata[SOFT_LABELS_KEY])["encoding"] == encoding
            assert decode_table(table).schema.remove_metadata().equals(JOB_SCHEMA)
        streamed = [row for b in tc.stream(job, client=client) for row in b.to_pylist()]
        projected = [row for b in tc.stream(job, client=client, columns=["custom_id", "top_logprobs"])
                     for row in b.to_pylist()]
        assert list(projected[0]) == ["custom_id", "top_logprobs"]
        for rows in (streamed, [r for t in shard_tables(api, job) for r in decode_table(t).to_pylist()]):
            assert [r["custom_id"] for r in rows] == [r["custom_id"] for r in exact]
            assert [r["top_token_ids"] for r in rows] == [r["top_token_ids"] for r in exact]
            for column in ("token_logprobs", "top_logprobs"):
                assert np.abs(flat(rows, column) - flat(exact, column)).max() <= bound
        assert [r["top_logprobs"] for r in projected] == [r["top_logprobs"] for r in streamed]
    client.close()


@pytest.mark.parametrize("soft_labels, field", [
    ({"encoding": "bfloat16"}, "soft_labels.encoding"),
    ({"encoding": "compact", "step": 0.5}, "soft_labels.step"),
    ("compact", "soft_labels"),
])
def test_an_unknown_encoding_is_a_422_naming_the_field_and_creates_nothing(api, soft_labels, field):
    body = {**batch(None), "soft_labels": soft_labels}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert api.get("/v1/jobs").json()["data"] == []
