"""examples/distill.py trains a student on a finished job's shards and its loss falls: on the
real teacher's top-20 (streamed from the live service), and on scripted shards read from disk."""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

import teachercache as tc
from tests.integration.test_client_live import serve_on_loopback
from workers.scripted_engine import ScriptedEngine

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distill.py"
PROMPTS = [
    "The capital of France is",
    "Write a haiku about autumn leaves.",
    "Give three tips for a good night's sleep.",
    "What is the difference between a list and a tuple in Python?",
    "Name a color.",
    "Explain photosynthesis in one sentence.",
]


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("distill_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


distill = load_example()


def finished_job(client: tc.Client, requests: list[dict[str, Any]], **submit: Any) -> dict[str, Any]:
    job = client.submit(requests, **submit)
    return client.wait(job, poll_interval=0.2, timeout=600, raise_on_failure=True)


def first_and_last(losses: list[float], window: int = 10) -> tuple[float, float]:
    return statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])


@pytest.fixture
def live_url(rt, api_key, monkeypatch):
    from service.http.app import create_app

    monkeypatch.setenv("TEACHERCACHE_API_KEY", api_key)
    with serve_on_loopback(create_app(rt)) as url:
        yield url


@pytest.mark.engine
def test_loss_falls_on_the_real_teachers_top_k_streamed_from_the_service(
    live_url: str, start_worker, vllm_engine, capsys: pytest.CaptureFixture[str]
) -> None:
    start_worker(vllm_engine)
    requests = [{"custom_id": f"p{i}", "prompt": prompt} for i, prompt in enumerate(PROMPTS)]
    with tc.Client(live_url) as client:
        job = finished_job(client, requests, top_logprobs=20, sampling={"max_tokens": 16})
    assert job["counts"]["completed"] == len(PROMPTS)
    losses = distill.main(["--job", job["id"], "--url", live_url, "--steps", "60", "--log-every", "20"])
    first, last = first_and_last(losses)
    assert len(losses) == 60 and all(math.isfinite(loss) for loss in losses)
    assert last < 0.6 * first, (first, last)
    assert "loss: first 10 steps" in capsys.readouterr().out


@pytest.mark.parametrize("layout", [["--batch-size", "4"], ["--layout", "packed", "--tokens-per-batch", "64"]],
                         ids=["padded", "packed"])
def test_loss_falls_on_local_shards_with_cross_entropy(
    live_url: str, start_worker, tmp_path: Path, layout: list[str]
) -> None:
    start_worker(ScriptedEngine())
    requests = [{"custom_id": f"s{i}", "prompt_token_ids": [1, 2, 3, 50 + i]} for i in range(4)]
    with tc.Client(live_url) as client:
        job = finished_job(client, requests, top_logprobs=8, sampling={"max_tokens": 12})
        client.download(job, tmp_path / "shards")
    args = ["--shards", str(tmp_path / "shards"), "--steps", "40", "--alpha", "0.5", *layout]
    losses = distill.main(args)
    first, last = first_and_last(losses)
    assert all(math.isfinite(loss) for loss in losses) and last < 0.8 * first, (first, last)
