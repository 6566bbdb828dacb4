"""examples/on_policy.py: a tiny student samples, the live service scores its samples with the
default teacher (the real vLLM engine), and the reverse KL to the teacher falls over a few steps."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path
from typing import Any

import pytest

import teachercache as tc
from tests.integration.test_client_live import serve_on_loopback

pytest.importorskip("vllm")
pytestmark = pytest.mark.engine

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "on_policy.py"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("on_policy_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_on_policy_loop_lowers_the_reverse_kl(rt, api_key, start_worker, vllm_engine):
    from service.http.app import create_app

    example = load_example()
    start_worker(vllm_engine)
    with serve_on_loopback(create_app(rt)) as url, tc.Client(url, api_key=api_key, timeout=300) as client:
        losses = example.main(["--steps", "12", "--new-tokens", "8", "--lr", "1e-2", "--log-every", "4"],
                              client=client)
    assert len(losses) == 12 and all(loss >= 0 for loss in losses)
    first, last = statistics.fmean(losses[:3]), statistics.fmean(losses[-3:])
    assert last < 0.8 * first, losses
