"""The worker's places kept for interactive work are places in its engine too: the vLLM engine is
built to run max_inflight + interactive_reserve sequences (vLLM's own default, 256 on the CPU
build, equals max_inflight: a trainer's batch would wait for batch sequences to end), and a claim
gives the reserve to interactive tasks whole."""

from __future__ import annotations

import sys
import types

from workers.loop import interactive_share
from workers.main import load_vllm_engine
from workers.settings import WorkerSettings


def test_the_engine_runs_every_place_the_worker_fills(fake_teacher, monkeypatch):
    built: dict = {}
    fake = types.ModuleType("workers.vllm_adapter")
    fake.VllmEngine = types.SimpleNamespace(load=lambda folder, **kw: built.update(kw) or "engine")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "workers.vllm_adapter", fake)
    load_vllm_engine(WorkerSettings(max_inflight=100, interactive_reserve=30), fake_teacher)
    assert built["max_num_seqs"] == 130
    load_vllm_engine(WorkerSettings(max_num_seqs=50), fake_teacher)  # the operator's choice stands
    assert built["max_num_seqs"] == 50


def test_the_batch_share_bounds_only_the_places_batch_work_could_take():
    assert interactive_share(64, 0, 0.25) == 64  # a full worker: the reserve, all interactive
    assert interactive_share(320, 256, 0.25) == 256  # an idle one: batch work keeps 64 of its 256
    assert interactive_share(8, 8, 0.25) == 6
    assert interactive_share(1, None, 0.25) == 1 and interactive_share(0, None, 0.25) == 0
