"""The teacher as the API sees it: identity (revision, tokenizer hash) and tokenization."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from service.errors import Unavailable
from service.teachers.registry import TeacherSpec

TEACHER_INFO_FILE = "teacher.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def tokenizer_hash(folder: Path) -> str:
    """Hash of every file that decides how text becomes tokens (vocab, config, chat template)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()


@dataclass
class Teacher:
    """A registered teacher with its prepared folder: identity plus a thread-safe tokenizer."""

    spec: TeacherSpec
    folder: Path

    @cached_property
    def info(self) -> dict[str, Any]:
        path = self.folder / TEACHER_INFO_FILE
        if path.exists():
            info: dict[str, Any] = json.loads(path.read_text())
            return info
        if not self.folder.exists():
            raise Unavailable(f"teacher {self.spec.name!r} is not prepared (run `teachercache teacher prepare`)")
        config = json.loads((self.folder / "config.json").read_text())
        return {"revision": self.spec.revision or "unversioned", "tokenizer_hash": tokenizer_hash(self.folder),
                "vocab_size": config["vocab_size"]}

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def revision(self) -> str:
        return self.spec.revision or self.info["revision"]

    @property
    def tokenizer_hash(self) -> str:
        return str(self.info["tokenizer_hash"])

    @property
    def vocab_size(self) -> int:
        return int(self.info["vocab_size"])

    @cached_property
    def _tokenizer(self) -> Any:  # a transformers fast tokenizer (its stubs type the calls below loosely)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    @cached_property
    def _lock(self) -> threading.Lock:
        # Hugging Face fast tokenizers are not safe to share across threads mid-call.
        return threading.Lock()

    def encode_text(self, text: str) -> list[int]:
        """A plain prompt: the text's tokens with the tokenizer's usual special tokens."""
        with self._lock:
            return list(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_continuation(self, text: str) -> list[int]:
        """A response to score: its tokens alone, no BOS."""
        with self._lock:
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        with self._lock:
            ids = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return str(self._tokenizer.decode(ids))

    def decode_text(self, ids: list[int]) -> str:
        """Generated tokens as text, special tokens skipped (as the engine adapter decodes them)."""
        with self._lock:
            return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    @cached_property
    def _pieces(self) -> dict[int, str]:
        return {}

    def decode_token(self, token_id: int) -> str:
        """One token's text alone (vLLM's `decoded_token`), remembered: a scored batch names the
        same few thousand ids over and over."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.decode([token_id])
        return piece

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.spec.remote.model if self.spec.is_remote else self.spec.model or str(self.folder),
            "remote": self.spec.is_remote,
            "revision": self.revision,
            "max_context_length": self.spec.max_model_len,
            "max_top_logprobs": self.spec.max_top_logprobs,
            "vocab_size": self.vocab_size,
            "tokenizer_hash": self.tokenizer_hash,
        }
