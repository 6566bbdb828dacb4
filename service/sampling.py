"""Sampling parameters: the one definition every layer derives from.

`Sampling` is what a job (and each of its requests) may ask for, with its defaults and bounds.
From it come: the native API's schema (`service/jobs/schemas.py`), the per-request override
(`SamplingOverride`: the same fields, all optional), the defaults the cache key compares with
(`service/cachekey.py`), what reaches an engine (`workers/engine.py` uses this class itself),
vLLM's `SamplingParams` (the field names are vLLM's), the remote adapter's request body and the
OpenAI batch parser (fields marked `OPENAI`: OpenAI's API has them under the same name).

A new parameter is one field here, with a default that leaves outputs as they were: the cache
key hashes a parameter added later only when it differs from its default, so entries keyed
before it was added are still found (see `service/cachekey.py`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from service.text import StorableText

INT32_MAX = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]  # checked against the teacher's vocabulary later


class OpenAIName:
    """Marks a field OpenAI's completions and chat APIs take under the same name and meaning."""


OPENAI = OpenAIName()


def one_stop_string(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


StopStrings = Annotated[tuple[StorableText, ...], BeforeValidator(one_stop_string)]


class Sampling(BaseModel):
    """Frozen (engines hash and share it); lists are tuples, which JSON renders as arrays."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: Annotated[int, OPENAI] = Field(default=128, ge=1, le=32768)
    temperature: Annotated[float, OPENAI] = Field(default=1.0, ge=0.0, le=10.0)
    top_p: Annotated[float, OPENAI] = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, le=INT32_MAX)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: Annotated[int, OPENAI] = Field(default=0, ge=0, le=2**63 - 1)
    n: Annotated[int, OPENAI] = Field(default=1, ge=1, le=64)
    stop: Annotated[StopStrings, OPENAI] = Field(default=(), max_length=16)
    stop_token_ids: tuple[TokenId, ...] = Field(default=(), max_length=64)
    presence_penalty: Annotated[float, OPENAI] = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: Annotated[float, OPENAI] = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False

    def values(self) -> dict[str, Any]:
        """Every parameter, lists as lists (the JSON form stored with jobs and tasks)."""
        return self.model_dump(mode="json")

    def differing(self, other: Sampling) -> dict[str, Any]:
        """The parameters whose value here differs from `other`'s (JSON form)."""
        if self is other:  # a request without its own parameters runs with the job's object itself
            return {}
        mine, theirs = self.values(), other.values()
        return {name: value for name, value in mine.items() if value != theirs[name]}


def defaults(definition: type[Sampling] = Sampling) -> dict[str, Any]:
    return definition().values()


def openai_names(definition: type[Sampling] = Sampling) -> tuple[str, ...]:
    return tuple(name for name, info in definition.model_fields.items() if OPENAI in info.metadata)


def engine_only_names(definition: type[Sampling] = Sampling) -> tuple[str, ...]:
    """Parameters a plain OpenAI server has no field for (vLLM's extensions carry them)."""
    return tuple(name for name in definition.model_fields if name not in openai_names(definition))


def override_model(definition: type[Sampling]) -> type[BaseModel]:
    """The same fields, bounds and validators, each optional: what one request may change."""
    fields: dict[str, Any] = {}
    for name, info in definition.model_fields.items():
        optional = copy.copy(info)
        optional.default, optional.default_factory = None, None
        annotation: Any = info.annotation  # a type at run time (`int`, `list[int]`): `| None` makes it optional
        fields[name] = (annotation | None, optional)
    return create_model(f"{definition.__name__}Override", __config__=ConfigDict(extra="forbid", frozen=True),
                        **fields)


if TYPE_CHECKING:
    SamplingOverride = Any  # built at run time (below), so mypy knows none of its fields
else:
    SamplingOverride = override_model(Sampling)
    SamplingOverride.__doc__ = "A request's own sampling parameters: each one given replaces the job's."


def apply_override(base: Sampling, override: BaseModel | None) -> Sampling:
    if override is None:
        return base
    changed = override.model_dump(exclude_none=True)
    return base.model_copy(update=changed) if changed else base


# -- sampled soft labels ------------------------------------------------------------------
# Draws of a position's full distribution are recorded beside the top-k when a job's soft labels
# are `{"kind": "sampled", ...}`. They are not a sampling parameter of the completion (which is
# generated exactly as without them), but they determine the output, so the normalised sampling
# a task carries (and the cache key hashes, as a parameter added after key version 2: only when
# present) holds them under DRAWS_KEY. Bounds: counts fit in a byte; the temperature is the
# range where exp(logit / T) stays finite in float32 for real logits.
MAX_DRAWS = 255
MIN_DRAW_TEMPERATURE = 0.05
MAX_DRAW_TEMPERATURE = 10.0
DRAWS_KEY = "draws"


class Draws(BaseModel):
    """N draws with replacement from the teacher's raw distribution at temperature T, by their
    own generator seeded with `seed`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    draws: int = Field(default=50, ge=1, le=MAX_DRAWS)
    temperature: float = Field(default=1.0, ge=MIN_DRAW_TEMPERATURE, le=MAX_DRAW_TEMPERATURE)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)


def with_draws(normalized: dict[str, Any], draws: Draws | None) -> dict[str, Any]:
    """Normalised sampling (cachekey.normalize_sampling) plus the draws, when there are any."""
    if draws is None:
        return normalized
    return {**normalized, DRAWS_KEY: draws.model_dump()}


def split_draws(task_sampling: dict[str, Any]) -> tuple[dict[str, Any], Draws | None]:
    """A task's sampling JSON back into (the sampling parameters, the draws or None)."""
    if DRAWS_KEY not in task_sampling:
        return task_sampling, None
    rest = {k: v for k, v in task_sampling.items() if k != DRAWS_KEY}
    return rest, Draws.model_validate(task_sampling[DRAWS_KEY])
