"""The teacher registry: which teachers exist, where their weights are, how they tokenize."""

from service.teachers.registry import TeacherSpec, load_registry

__all__ = ["TeacherSpec", "load_registry"]
