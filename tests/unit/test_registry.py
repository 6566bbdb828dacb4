"""The teacher registry: operators add and override teachers in a YAML file."""

from __future__ import annotations

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
