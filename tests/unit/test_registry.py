"""The teacher registry: operators add and override teachers in a YAML file."""

from __future__ import annotations

import sys
import types

from service.teachers.registry import load_registry


def test_operators_add_and_override_teachers_in_a_file(tmp_path):
    extra = tmp_path / "teachers.yaml"
    extra.write_text(
        "teachers:\n"
        "  - {name: big-teacher, model: /models/big, max_model_len: 8192, max_top_logprobs: 50, dtype: bfloat16}\n"
        "  - {name: smollm2-135m-instruct, max_model_len: 1024}\n"
    )
    registry = load_registry(extra)
    assert registry.default == "smollm2-135m-instruct"
    big = registry.get("big-teacher")
    assert str(big.model_dir(tmp_path)) == "/models/big"
    assert big.max_top_logprobs == 50 and big.dtype == "bfloat16"
    assert registry.get("smollm2-135m-instruct").max_model_len == 1024


def test_a_teacher_spanning_nodes_names_its_parallelism_and_vllms_ray_executor(tmp_path, monkeypatch):
    import pytest

    from workers import main as worker_main
    from workers.settings import WorkerSettings

    extra = tmp_path / "teachers.yaml"
    extra.write_text(
        "teachers:\n"
        "  - {name: huge, model: /models/huge, tensor_parallel_size: 8, pipeline_parallel_size: 2,"
        " distributed_executor_backend: ray}\n"
        "  - {name: odd, model: /models/odd, distributed_executor_backend: slurm}\n"
    )
    with pytest.raises(ValueError, match="distributed_executor_backend is 'slurm'; one of mp, ray"):
        load_registry(extra)
    extra.write_text(extra.read_text().splitlines()[0] + "\n" + extra.read_text().splitlines()[1] + "\n")
    huge = load_registry(extra).get("huge")
    assert huge.gpus_per_engine() == 16 and huge.engine_on_ray_workers
    assert not load_registry(extra).get("smollm2-135m-instruct").engine_on_ray_workers
    # The worker hands the parallelism to vLLM as its engine arguments.
    seen = {}

    class VllmEngine:  # stands in for the adapter's (no vLLM import in the unit lane)
        @staticmethod
        def load(folder, **kwargs):
            seen.update(kwargs)

    monkeypatch.setitem(sys.modules, "workers.vllm_adapter", types.SimpleNamespace(VllmEngine=VllmEngine))

    class Teacher:
        folder, name, spec = "/models/huge", "huge", huge

    worker_main.load_vllm_engine(WorkerSettings(), Teacher())  # type: ignore[arg-type]
    assert {k: seen[k] for k in ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend")} \
        == {"tensor_parallel_size": 8, "pipeline_parallel_size": 2, "distributed_executor_backend": "ray"}
