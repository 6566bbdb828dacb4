"""The synchronous endpoints' use cases: a body becomes jobs in the interactive lane, the caller
waits for them, and their rows are read back for rendering.

A completions body needs at most two jobs: a `score` job for the prompt logprobs (echo with
logprobs, or `prompt_logprobs`), each prompt `[t0, t1, ..., tn]` scored as the response
`[t1..tn]` after the one-token prompt `[t0]` (the teacher-forced distribution at every position
after the first, which is what vLLM's prompt logprobs are; the first is `null`), and a `generate`
job for what follows the prompt (unless `max_tokens` is 0 with echo). Both are ordinary jobs of
the caller's tenant: the cache answers a sequence scored before, the limits and spend apply.

Nothing here holds a database transaction or a thread while the teacher works: submission is
one short transaction; the wait is an asyncio task woken by Postgres when one of its jobs is
ready (JOBS_READY with the job's id, service/notify.py), which then reads the jobs' maintained
counters (a primary-key read, in a worker thread only for that read); the rows are read in
another short transaction once nothing is pending.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.errors import Conflict, OpenAIError, TeachercacheError
from service.jobs.limits import JobLimits
from service.jobs.schemas import JobCreate, RequestIn
from service.jobs.service import JobService, prepare_submission
from service.notify import JOBS_READY, LoopEvent
from service.online.repository import OnlineRepository
from service.online.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from service.results.assemble import computed_pieces
from service.results.repository import ResultRepository
from service.runtime import Runtime
from service.sampling import Sampling
from service.teachers.tokenizer import Teacher

BodyT = TypeVar("BodyT", bound=SamplingFields)
ONLINE_METADATA = {"source": "online"}  # marks the jobs of these endpoints (GET /v1/jobs shows them)


@dataclass
class Plan:
    """What one body asks of the teacher."""

    teacher: Teacher
    prompts: list[list[int]]  # token ids, one list per prompt
    texts: list[str | None]  # the given text of each prompt (None: given as token ids)
    score_k: int | None = None  # prompt logprobs wanted, with this many alternatives
    generate: Sampling | None = None  # a continuation wanted, with these parameters
    generate_k: int | None = None  # logprobs of the continuation (None: not asked)
    echo: bool = False
    messages: list[dict[str, Any]] | None = None  # chat: the conversation of the only prompt

    @property
    def scored(self) -> list[int]:
        """The prompts that have positions to score (a one-token prompt has none)."""
        return [i for i, ids in enumerate(self.prompts) if len(ids) > 1]


@dataclass
class Answer:
    """The rows that answer a plan, by job mode ("score", "generate"), in request order."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    cached: bool = False  # every row came from the cache

    def scores(self, plan: Plan) -> list[dict[str, Any] | None]:
        """Per prompt its score row (None where not scored)."""
        scores: list[dict[str, Any] | None] = [None] * len(plan.prompts)
        if "score" in self.tables:
            for row in self.tables["score"].to_pylist():
                scores[plan.scored[row["request_index"]]] = row
        return scores

    def samples(self, plan: Plan) -> list[list[dict[str, Any]]]:
        """Per prompt its generated samples, in sample order."""
        samples: list[list[dict[str, Any]]] = [[] for _ in plan.prompts]
        if "generate" in self.tables:
            for row in self.tables["generate"].to_pylist():
                samples[row["request_index"]].append(row)
        return samples


UNION_TAG = re.compile(r"^(str|int|float|bool|[\w.]*\[.*\])$")  # pydantic's names of union members in `loc`


def error_place(error: Any) -> str:
    """`body.prompt.1`: where an error is, without the union members pydantic names on the way."""
    return ".".join(str(p) for p in ("body", *error["loc"]) if not (isinstance(p, str) and UNION_TAG.match(p)))


def parse_body(model: type[BodyT], raw: bytes) -> BodyT:
    """A body as vLLM's server parses it, refused as it refuses one: 400, the most specific
    error's place (`body.prompt.1`) as `param`, every error in the message."""
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        places = [error_place(e) for e in errors]
        lines = "\n".join(f"  {{'type': {e['type']!r}, 'loc': {place!r}, 'msg': {e['msg']!r}}}"
                          for e, place in list(zip(errors, places))[:20])
        # The error inside the union member that fits (a float among token ids), not the members'
        # "not a string" / "not a list", as vLLM reports it.
        specific = [p for e, p in zip(errors, places) if e["type"] not in ("string_type", "list_type")]
        param = (specific or places)[0] if places else None
        raise OpenAIError(f"{len(errors)} validation errors:\n{lines}", param, 400, "Bad Request") from None


def sampling_of(body: SamplingFields, max_tokens: int) -> Sampling:
    """vLLM's fields onto the one sampling definition; a value out of its bounds is vLLM's 400."""
    given = {name: getattr(body, name) for name in ("temperature", "top_p", "top_k", "min_p", "seed", "stop",
                                                    "stop_token_ids", "presence_penalty", "frequency_penalty",
                                                    "repetition_penalty", "ignore_eos")}
    given = {name: value for name, value in given.items() if value is not None}
    try:
        return Sampling(max_tokens=max_tokens, n=body.n, **given)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise OpenAIError(f"{param}: {first.get('msg')}", param) from None


def check_unsupported(body: SamplingFields) -> None:
    if body.stream:
        raise OpenAIError("stream: this server answers whole responses only; send stream=false", "stream")
    if body.use_beam_search:
        raise OpenAIError("use_beam_search: beam search is not supported", "use_beam_search")


def completion_prompts(body: CompletionRequest, teacher: Teacher) -> tuple[list[list[int]], list[str | None]]:
    """The prompt forms vLLM takes (a text, texts, token ids, lists of token ids) as token ids."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]  # type: ignore[arg-type]  # a list of ints: one prompt of token ids
    else:
        items = list(prompt)  # type: ignore[arg-type]  # texts or lists of token ids
    if not items:
        raise OpenAIError("You must pass at least one prompt")
    ids: list[list[int]] = []
    texts: list[str | None] = []
    for item in items:
        if isinstance(item, str):
            ids.append(teacher.encode_text(item))
            texts.append(item)
        else:
            ids.append(list(item))
            texts.append(None)
        if not ids[-1]:
            raise OpenAIError("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    return ids, texts


def check_logprobs(value: int | None, name: str, teacher: Teacher) -> None:
    limit = teacher.spec.max_top_logprobs
    if value is not None and not 0 <= value <= limit:
        raise OpenAIError(f"{name}: {value} is outside [0, {limit}], this teacher's range of logprobs", name)


def check_context(prompts: list[list[int]], teacher: Teacher, max_tokens: int) -> None:
    """vLLM's own check, with its parameter name: a prompt that leaves no room for the output."""
    limit = teacher.spec.max_model_len
    for ids in prompts:
        if len(ids) + max(max_tokens, 1) > limit:
            raise OpenAIError(f"This model's maximum context length is {limit} tokens. However, your prompt "
                              f"contains {len(ids)} input tokens and asks for {max_tokens} output tokens",
                              "input_tokens")


def plan_completion(body: CompletionRequest, rt: Runtime) -> Plan:
    check_unsupported(body)
    teacher = teacher_of(rt, body.model)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    prompts, texts = completion_prompts(body, teacher)
    check_logprobs(body.logprobs, "logprobs", teacher)
    check_logprobs(body.prompt_logprobs, "prompt_logprobs", teacher)
    check_context(prompts, teacher, max_tokens)
    score_k = body.prompt_logprobs if body.prompt_logprobs is not None else (body.logprobs if body.echo else None)
    plan = Plan(teacher, prompts, texts, score_k=score_k, generate_k=body.logprobs, echo=body.echo)
    if max_tokens == 0 and not body.echo:
        raise OpenAIError("max_tokens: 0 generates nothing; use it with echo to score the prompt", "max_tokens")
    sampling = sampling_of(body, max(max_tokens, 1))  # checked even when nothing is generated, as vLLM does
    if max_tokens > 0:
        plan.generate = sampling
    return plan


def plan_chat(body: ChatCompletionRequest, rt: Runtime) -> Plan:
    check_unsupported(body)
    teacher = teacher_of(rt, body.model)
    messages = [m.model_dump() for m in body.messages]
    ids = teacher.encode_chat(messages)
    limit = teacher.spec.max_model_len
    max_tokens = body.max_completion_tokens or body.max_tokens or max(limit - len(ids), 1)
    if body.top_logprobs is not None and not body.logprobs:
        raise OpenAIError("top_logprobs: needs logprobs set to true", "top_logprobs")
    check_logprobs(body.top_logprobs, "top_logprobs", teacher)
    check_logprobs(body.prompt_logprobs, "prompt_logprobs", teacher)
    check_context([ids], teacher, max_tokens)
    generate_k = (body.top_logprobs or 0) if body.logprobs else None
    return Plan(teacher, [ids], [None], generate=sampling_of(body, max_tokens), generate_k=generate_k,
                messages=messages, score_k=body.prompt_logprobs)


def teacher_of(rt: Runtime, model: str) -> Teacher:
    if model not in rt.teachers.names():
        names = ", ".join(sorted(rt.teachers.names()))
        raise OpenAIError(f"The model `{model}` does not exist. Valid aliases: {names}.", "model", 404,
                          "NotFoundError")
    return rt.teachers.get(model)


def score_job(plan: Plan) -> JobCreate | None:
    if plan.score_k is None or not plan.scored:
        return None
    requests = [RequestIn(prompt_token_ids=plan.prompts[i][:1], response_token_ids=plan.prompts[i][1:])
                for i in plan.scored]
    return JobCreate(teacher=plan.teacher.name, mode="score", top_logprobs=plan.score_k, requests=requests,
                     metadata=ONLINE_METADATA)


def generate_job(plan: Plan) -> JobCreate | None:
    if plan.generate is None:
        return None
    requests = [RequestIn(prompt_token_ids=ids) for ids in plan.prompts]
    return JobCreate(teacher=plan.teacher.name, mode="generate", top_logprobs=plan.generate_k or 0,
                     sampling=plan.generate, requests=requests, metadata=ONLINE_METADATA)


class OnlineService:
    """The caller's synchronous requests: submit (one transaction), wait (no transaction), read."""

    def __init__(self, rt: Runtime, tenant: str, limits: JobLimits) -> None:
        self.rt, self.tenant, self.limits = rt, tenant, limits

    async def answer(self, plan: Plan) -> Answer:
        jobs = await run_in_threadpool(self.submit, plan)
        try:
            await self.wait([job_id for job_id in jobs.values()])
        except asyncio.CancelledError:  # the client went away: its requests stop being handed out
            await run_in_threadpool(self.cancel, list(jobs.values()))
            raise
        return await run_in_threadpool(self.read, plan, jobs)

    def submit(self, plan: Plan) -> dict[str, str]:
        """Write the plan's jobs (interactive) in one transaction; their ids by mode."""
        bodies = {mode: body for mode, body in (("score", score_job(plan)), ("generate", generate_job(plan)))
                  if body is not None}
        try:
            prepared = {mode: prepare_submission(body, plan.teacher, self.limits) for mode, body in bodies.items()}
            with self.rt.sessions() as db, db.begin():
                service = JobService(db, self.tenant, self.limits, prices=self.rt.teachers.prices)
                return {mode: service.submit(body, plan.teacher, prepared=prepared[mode], interactive=True).id
                        for mode, body in bodies.items()}
        except TeachercacheError as exc:
            raise OpenAIError.of(exc) from None

    async def wait(self, job_ids: list[str]) -> None:
        """Until none of the jobs has a pending request. The counters are read when Postgres
        notifies that one of these jobs is ready (and when the listening connection comes up or
        fails), else every online_idle_poll_s in case a notification was missed; while the
        connection is down, every online_poll_s growing to 10x that."""
        settings = self.rt.settings
        deadline = time.monotonic() + settings.online_timeout_s
        interval = settings.online_poll_s
        listener = self.rt.listener
        woken = LoopEvent(asyncio.get_running_loop())
        for job_id in job_ids:  # before the first read: a job readied after it still wakes us
            listener.subscribe(JOBS_READY, woken, job_id)
        try:
            while True:
                woken.clear()  # before the read: a notification during it ends the next wait at once
                if not await run_in_threadpool(self.pending, job_ids):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    await run_in_threadpool(self.cancel, job_ids)
                    raise OpenAIError(f"the teacher did not answer within {settings.online_timeout_s:g} s "
                                      "(TEACHERCACHE_ONLINE_TIMEOUT_S); is a worker serving this teacher?",
                                      None, 504, "TimeoutError")
                if listener.connected:
                    await woken.wait_async(min(settings.online_idle_poll_s, left))
                else:
                    await woken.wait_async(min(interval, left))
                    interval = min(interval * 1.5, settings.online_poll_s * 10)
        finally:
            listener.unsubscribe(woken)

    def pending(self, job_ids: list[str]) -> int:
        with self.rt.sessions() as db:
            return OnlineRepository(db).pending(job_ids)

    def cancel(self, job_ids: list[str]) -> None:
        """Stop handing out the jobs' requests; a job that finished meanwhile is left as it is."""
        for job_id in job_ids:
            try:
                with self.rt.sessions() as db, db.begin():
                    JobService(db, self.tenant, self.limits).cancel(job_id)
            except Conflict:
                pass

    def read(self, plan: Plan, jobs: dict[str, str]) -> Answer:
        """The jobs' rows, straight from the result shards (the finalizer then ends the jobs
        without assembling job shards: service/results/assemble.py)."""
        answer = Answer()
        with self.rt.sessions() as db:
            for mode, job_id in jobs.items():
                answer.tables[mode] = job_rows(db, self.rt, job_id, len(plan.prompts))
        cached = [c for t in answer.tables.values() for c in t.column("cached").to_pylist()]
        answer.cached = bool(cached) and all(cached)
        return answer


def job_rows(db: Any, rt: Runtime, job_id: str, limit: int) -> pa.Table:
    """A job's rows in request and sample order, from its result shards, with the result shards'
    own columns (token_ranks) that job shards drop. A failed request is the caller's error."""
    rows = ResultRepository(db).assembly_rows(job_id, -1, max(limit, 1))
    failed = [r for r in rows if r.shard_path is None]
    if failed:
        raise OpenAIError(f"the teacher failed this request: {failed[0].error or failed[0].state}", None, 500,
                          "InternalServerError")
    table = pa.concat_tables(computed_pieces(rt.storage, rows), promote_options="default")
    return table.take(pc.sort_indices(table, [("request_index", "ascending"), ("sample_index", "ascending")]))
