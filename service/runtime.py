"""What a process of the service holds: settings, database sessions, storage, teachers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import sqlalchemy as sa
from sqlalchemy import orm

from service.db import make_engine, resolve_database_url, session_factory
from service.notify import Listener
from service.settings import ServiceSettings
from service.storage import Storage, open_storage
from service.teachers.catalog import TeacherCatalog


@dataclass
class Runtime:
    settings: ServiceSettings
    database_url: str

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Runtime:
        return cls(settings, resolve_database_url(settings))

    @cached_property
    def engine(self) -> sa.Engine:
        return make_engine(self.database_url, self.settings.db_pool_timeout_s)

    @cached_property
    def sessions(self) -> orm.sessionmaker[orm.Session]:
        return session_factory(self.engine)

    @cached_property
    def listener(self) -> Listener:
        """This process's one LISTEN connection (started by its first subscriber)."""
        return Listener(self.database_url)

    @cached_property
    def storage(self) -> Storage:
        return open_storage(self.settings.shards_uri, spool_dir=self.settings.state_dir / "spool")

    @cached_property
    def teachers(self) -> TeacherCatalog:
        return TeacherCatalog.from_settings(self.settings)

    def teacher_metadata(self) -> dict[str, dict[str, str]]:
        """Shard metadata per teacher name: identity recorded in every output shard."""
        return {t.name: {"teacher": t.name, "teacher_revision": t.revision, "tokenizer_hash": t.tokenizer_hash}
                for t in self.teachers.available()}
