"""OpenAI batch lines that used to answer 500. A bad model is a file-level problem (as OpenAI's
validation has it): the batch fails naming the line and field, creates no job and spends no
submission token. A bad parameter in a line's body fails that line alone, naming the field."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from service.openai_batch.input_file import LineFailure, ParsedInput, parse_input
from service.tenants.models import Tenant
from tests.integration.test_openai_batch import CHAT, COMPLETIONS, chat_line, completion_line, oai, upload  # noqa: F401

MODELS = {"smollm2-135m-instruct"}


def file_of(*lines) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


@pytest.mark.parametrize("endpoint, bad, param", [
    (CHAT, chat_line(1, model=["x"]), "body.model"),
    (CHAT, chat_line(1, model={}), "body.model"),
])
def test_a_bad_model_fails_the_file_naming_its_line_and_field(endpoint, bad, param):
    errors = parse_input(file_of(chat_line(0), bad), endpoint, MODELS)
    assert isinstance(errors, list) and [(e.line, e.param) for e in errors] == [(2, param)], errors


@pytest.mark.parametrize("endpoint, bad, param", [
    (CHAT, chat_line(1, logprobs=True, top_logprobs="abc"), "body.top_logprobs"),
    (CHAT, chat_line(1, logprobs=[1]), "body.logprobs"),
    (CHAT, chat_line(1, logprobs=True, top_logprobs=-3), "body.top_logprobs"),
    (COMPLETIONS, completion_line(1, logprobs=-1), "body.logprobs"),
    (COMPLETIONS, completion_line(1, logprobs=[1]), "body.logprobs"),
])
def test_a_bad_parameter_fails_its_line_alone_naming_the_field(endpoint, bad, param):
    good = chat_line if endpoint == CHAT else completion_line
    parsed = parse_input(file_of(good(0), bad), endpoint, MODELS)
    assert isinstance(parsed, ParsedInput), parsed
    assert parsed.runnable == [0] and isinstance(parsed.lines[1].request, LineFailure)
    assert parsed.lines[1].request.param == param and param in parsed.lines[1].request.message


@pytest.mark.parametrize("endpoint, number", [(COMPLETIONS, '"logprobs": 1e400'), (CHAT, '"temperature": 1e400'),
                                              (CHAT, '"max_tokens": 1e400')])
def test_a_number_too_large_for_a_float_fails_its_line_naming_the_field(endpoint, number):
    good = chat_line(0) if endpoint == CHAT else completion_line(0)
    line = json.dumps(good).replace('"logprobs": 2', number).replace('"max_tokens": 6', number)
    assert '1e400' in line
    [parsed] = parse_input(file_of(line), endpoint, MODELS).lines
    assert parsed.request.param == "body." + number.split('"')[1]


def test_lines_split_on_newline_only_not_at_unicode_separators():
    line = chat_line(0, messages=[{"role": "user", "content": "a\u2028b\u0085c\x1cd"}])
    parsed = parse_input(json.dumps(line, ensure_ascii=False).encode() + b"\r\n", CHAT, MODELS)
    assert isinstance(parsed, ParsedInput), parsed
    assert parsed.job.requests[0].messages[0].content == "a\u2028b\u0085c\x1cd"


def test_a_bad_line_spends_no_submission_token_and_creates_no_job(oai, api, rt):  # noqa: F811
    file_id = upload(oai, [chat_line(0), chat_line(1, model=["x"])])
    batch = oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "failed" and [(e.line, e.param) for e in batch.errors.data] == [(2, "body.model")]
    assert api.get("/v1/jobs").json()["data"] == []
    with rt.sessions() as db:
        assert db.scalar(sa.select(Tenant.rate_tokens).where(Tenant.name == "alpha")) is None  # never spent


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_batch_output_writes_minus_infinity_as_openai_does(endpoint):
    from service.openai_batch.output_file import success_line

    inf = float("-inf")
    sample = {"custom_id": "c0", "completion_token_ids": [5, 6], "completion_text": "a b", "token_logprobs": [-0.5, inf],
              "top_token_ids": [[5, 7], [6, 8]], "top_logprobs": [[-0.5, inf], [inf, float("nan")]],
              "finish_reason": "length", "error": None, "sample_index": 0, "prompt_token_ids": [1, 2]}
    line = success_line([sample], endpoint, "m", 0, True, lambda t: f"t{t}")
    parsed = json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert "Infinity" not in line and "NaN" not in line and "-9999.0" in line and parsed["custom_id"] == "c0"
