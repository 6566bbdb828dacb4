"""One bad result fails only its own task, with a reason; its neighbours in the write batch land."""

from __future__ import annotations

from tests.jobs import download_rows, wait_for
from workers.engine import EngineResult
from workers.scripted_engine import ScriptedEngine

BAD, NUL = 7777, 8888


class BadResults(ScriptedEngine):
    """A token id past int32 for prompts holding BAD (as a remote teacher may send); an error text
    with NUL for prompts holding NUL."""

    def _finish(self, request):
        if NUL in request.prompt_token_ids:
            self.abort([request.key])
            return EngineResult(key=request.key, error="remote said: \x00 bad")
        result = super()._finish(request)
        if BAD in request.prompt_token_ids:
            result.samples[0].completion_token_ids[0] = 2**31
        return result


def test_a_bad_result_fails_only_its_own_task(api, start_worker):
    requests = [{"custom_id": f"ok{i}", "prompt_token_ids": [1, 2, 10 + i]} for i in range(4)]
    requests.insert(2, {"custom_id": "bad", "prompt_token_ids": [1, BAD]})
    requests.insert(4, {"custom_id": "nul", "prompt_token_ids": [1, NUL]})
    job = api.post("/v1/jobs", json={"requests": requests, "sampling": {"max_tokens": 3}}).json()
    start_worker(BadResults(), result_shard_rows=100, flush_s=0.5)
    job = wait_for(api, job["id"], timeout=60)
    assert job["status"] == "succeeded" and job["counts"]["failed"] == 2 and job["counts"]["completed"] == 4
    errors = {e["custom_id"]: e["error"] for e in api.get(f"/v1/jobs/{job['id']}/errors").json()["errors"]}
    assert set(errors) == {"bad", "nul"}
    assert "could not be stored" in errors["bad"] and "remote said" in errors["nul"]
    rows = {r["custom_id"]: r for r in download_rows(api, job)}
    assert all(rows[f"ok{i}"]["error"] is None for i in range(4))
