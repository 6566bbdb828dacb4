"""The OpenAI/vLLM-compatible synchronous endpoints (service/online): what on-policy trainers
send to a vLLM teacher server. Errors in vLLM's shape; the answer as vLLM's JSON, or Arrow IPC
with `Accept: application/vnd.apache.arrow.stream`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from service.http.deps import Limits, Rt, Who, caller
from service.online.arrow import render_arrow
from service.online.render import JSON, json_bytes, models_list, render_chat, render_completion
from service.online.schemas import ChatCompletionRequest, CompletionRequest
from service.online.service import OnlineService, parse_body, plan_chat, plan_completion
from teachercache.online_format import MEDIA_TYPE

router = APIRouter(prefix="/v1", tags=["online"], dependencies=[Depends(caller)])
health_router = APIRouter()


@router.post("/completions")
async def completions(request: Request, rt: Rt, who: Who, limits: Limits) -> Response:
    body = await run_in_threadpool(parse_body, CompletionRequest, await request.body())
    plan = await run_in_threadpool(plan_completion, body, rt)
    answer = await OnlineService(rt, who.tenant, limits).answer(plan)
    if MEDIA_TYPE in request.headers.get("accept", ""):
        return Response(await run_in_threadpool(render_arrow, plan, answer, body.model), media_type=MEDIA_TYPE)
    payload = await run_in_threadpool(lambda: json_bytes(render_completion(plan, answer, body.model)))
    return Response(payload, media_type=JSON)


@router.post("/chat/completions")
async def chat_completions(request: Request, rt: Rt, who: Who, limits: Limits) -> Response:
    body = await run_in_threadpool(parse_body, ChatCompletionRequest, await request.body())
    plan = await run_in_threadpool(plan_chat, body, rt)
    answer = await OnlineService(rt, who.tenant, limits).answer(plan)
    payload = await run_in_threadpool(lambda: json_bytes(render_chat(plan, answer, body.model)))
    return Response(payload, media_type=JSON)


@router.get("/models")
def models(rt: Rt) -> dict[str, Any]:
    return models_list(rt.teachers.available())


@health_router.get("/health", tags=["health"], response_class=Response,
                   responses={200: {"description": "alive: an empty body, as vLLM's server answers", "content": {}}})
async def health() -> Response:
    """vLLM's liveness probe: 200 with an empty body (/healthz also checks the database)."""
    return Response(status_code=200)
