"""Teacher registry: the built-in teachers plus an operator's YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from service.errors import NotFound

BUILTIN_FILE = Path(__file__).with_name("builtin.yaml")


@dataclass(frozen=True)
class TeacherSpec:
    """What the registry says about one teacher.

    `model` is a local folder or a name the GPU host's vLLM can load; when unset, the teacher
    is prepared from `source` into `models_dir/<name>`.
    """

    name: str
    model: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    max_model_len: int = 2048
    max_top_logprobs: int = 20
    dtype: str = "auto"
    revision: str | None = None

    def model_dir(self, models_dir: Path) -> Path:
        return Path(self.model) if self.model else models_dir / self.name


@dataclass(frozen=True)
class Registry:
    default: str
    teachers: dict[str, TeacherSpec]

    def get(self, name: str) -> TeacherSpec:
        try:
            return self.teachers[name]
        except KeyError:
            known = ", ".join(sorted(self.teachers))
            raise NotFound(f"unknown teacher {name!r}; known teachers: {known}", field="teacher") from None


def _read(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def load_registry(extra_file: Path | None = None) -> Registry:
    """Built-in teachers, then the operator's file (entries with the same name replace built-ins)."""
    documents = [_read(BUILTIN_FILE)] + ([_read(extra_file)] if extra_file else [])
    teachers: dict[str, TeacherSpec] = {}
    default = ""
    for doc in documents:
        default = doc.get("default", default)
        for entry in doc.get("teachers", []):
            teachers[entry["name"]] = TeacherSpec(**entry)
    return Registry(default=default, teachers=teachers)
