"""The fleet's autoscaling signal: TaskRepository.pending_by_teacher counts one teacher's
claimable and leased tasks, capped, and leaves out work nobody waits for any more."""

from __future__ import annotations

from service.db import transaction
from service.queue.repository import TaskRepository

TEACHER = "smollm2-135m-instruct"


def submit(api, n: int, offset: int = 0) -> dict:
    body = {"teacher": TEACHER, "top_logprobs": 2, "sampling": {"max_tokens": 4},
            "requests": [{"custom_id": f"q{i}", "prompt_token_ids": [5, 6, offset + i]} for i in range(n)]}
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def pending(rt, teacher: str = TEACHER, cap: int = 1000):
    with transaction(rt.sessions) as db:
        return TaskRepository(db).pending_by_teacher(teacher, cap)


def test_counts_pending_then_leased_and_caps(api, rt):
    submit(api, 7)
    assert (pending(rt).pending, pending(rt).leased) == (7, 0)
    assert pending(rt, cap=3).pending == 3, "counting stops at the cap"
    assert pending(rt, teacher="another-teacher").outstanding == 0
    with transaction(rt.sessions) as db:
        claimed = TaskRepository(db).claim(TEACHER, "w1", 5, lease_s=60)
    assert len(claimed) == 5
    work = pending(rt)
    assert (work.pending, work.leased, work.outstanding) == (2, 5, 7)


def test_a_cancelled_jobs_tasks_are_not_pending(api, rt):
    job = submit(api, 4)
    submit(api, 2, offset=100)
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    assert pending(rt).pending == 2
