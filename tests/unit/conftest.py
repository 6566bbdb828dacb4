"""Fixtures of the fast lane: nothing here needs Postgres, vLLM or the prepared teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.teachers.registry import TeacherSpec
from service.teachers.tokenizer import TEACHER_INFO_FILE, Teacher, tokenizer_hash

FAKE_WORDS = ["hello", "world", "the", "capital", "of", "france", "is", "paris", "what", "?", "."]
# A ChatML-like template, as the default teacher's: the prompt ends with the assistant's header.
FAKE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_fake_teacher_folder(folder: Path) -> Path:
    """A word-level tokenizer of a dozen words, with a chat template: a teacher folder as
    `teachercache teacher prepare` leaves one, minus the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<bos>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    vocab = {token: i for i, token in enumerate(specials + FAKE_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = FAKE_CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    info = {"revision": "fake-1", "tokenizer_hash": tokenizer_hash(folder), "vocab_size": len(vocab)}
    (folder / TEACHER_INFO_FILE).write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="session")
def fake_teacher(tmp_path_factory) -> Teacher:
    folder = build_fake_teacher_folder(tmp_path_factory.mktemp("fake-teacher"))
    return Teacher(TeacherSpec(name="fake", max_model_len=32, max_top_logprobs=5), folder)
