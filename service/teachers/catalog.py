"""The teachers this deployment knows, each with its tokenizer loaded on first use."""

from __future__ import annotations

import threading
from pathlib import Path

from service.settings import ServiceSettings
from service.teachers.registry import Registry, load_registry
from service.teachers.tokenizer import Teacher


class TeacherCatalog:
    def __init__(self, registry: Registry, models_dir: Path) -> None:
        self.registry = registry
        self.models_dir = models_dir
        self._teachers: dict[str, Teacher] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> TeacherCatalog:
        return cls(load_registry(settings.teachers_file), settings.models_dir)

    def get(self, name: str | None) -> Teacher:
        spec = self.registry.get(name or self.registry.default)
        with self._lock:
            if spec.name not in self._teachers:
                self._teachers[spec.name] = Teacher(spec, spec.model_dir(self.models_dir))
            return self._teachers[spec.name]

    def names(self) -> set[str]:
        """Every teacher the registry lists, prepared or not."""
        return set(self.registry.teachers)

    def prices(self, name: str) -> tuple[float | None, float | None]:
        """USD per million prompt / completion tokens; (None, None) when unpriced or unknown."""
        spec = self.registry.teachers.get(name)
        return spec.prices() if spec is not None else (None, None)

    def available(self) -> list[Teacher]:
        """Teachers whose folder is prepared (tokenizer and identity readable)."""
        teachers = [self.get(name) for name in sorted(self.registry.teachers)]
        return [t for t in teachers if (t.folder / "config.json").exists()]
