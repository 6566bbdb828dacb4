"""The request bodies of the OpenAI/vLLM-compatible endpoints: the fields on-policy trainers send
to a vLLM server, under vLLM's names and defaults. Unknown fields are ignored, as vLLM ignores
them; a field this service cannot honour (streaming, beam search) is refused by the service."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from service.jobs.schemas import ChatMessage

TokenIds = list[StrictInt]
# vLLM's prompt forms: a text, a batch of texts, a token-id list, a batch of token-id lists.
Prompt = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class SamplingFields(BaseModel):
    """The sampling fields both endpoints share (service/sampling.py bounds them)."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    n: int = 1
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stream: bool = False
    use_beam_search: bool = False


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: Annotated[int | None, Field(ge=0)] = 16
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int | None, Field(ge=0)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=0)] = None
    logprobs: bool = False
    top_logprobs: int | None = None
    # vLLM's extra parameter: the rendered prompt's logprobs, scored (a trainer's teacher-forced
    # chat transcript), answered top-level as `prompt_logprobs`.
    prompt_logprobs: int | None = None
