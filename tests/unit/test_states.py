"""One definition of each state: the client agrees with the service, and SQL text names only real states."""

import re
from pathlib import Path

from service import states
from teachercache import _states as client_states

SERVICE = Path(states.__file__).parent
# `state = 'x'`, `status <> 'x'`, `state IN ('x', 'y')` in literal SQL (and partial-index predicates).
COMPARISON = re.compile(r"\b(state|status)\s*(?:=|<>|!=)\s*'([a-z_]+)'")
IN_LIST = re.compile(r"\b(state|status)\s+(?:NOT\s+)?IN\s*\(((?:\s*'[a-z_]+'\s*,?)+)\)")
ALLOWED = {
    "state": {*states.RequestState, *states.TaskState},
    "status": {*states.JobStatus, *states.BatchStatus},
}


def test_the_client_reads_the_job_states_the_service_writes():
    public = [s.value for s in states.JobStatus if s not in states.JOB_HIDDEN]
    assert [s.value for s in client_states.JobStatus] == public
    assert client_states.FINISHED == set(states.JOB_FINISHED)
    assert client_states.UNSUCCESSFUL == set(states.JOB_FINISHED) - {states.JobStatus.SUCCEEDED}


def literal_states_in(source: str) -> list[tuple[str, str]]:
    found = [(column, value) for column, value in COMPARISON.findall(source)]
    for column, values in IN_LIST.findall(source):
        found += [(column, value) for value in re.findall(r"'([a-z_]+)'", values)]
    return found


def test_the_scan_finds_what_it_looks_for():
    sql = "WHERE t.state = 'leased' AND j.status IN ('queued', 'runing') AND r.state <> 'done'"
    assert sorted(literal_states_in(sql)) == [("state", "done"), ("state", "leased"), ("status", "queued"),
                                              ("status", "runing")]


def test_sql_text_names_only_defined_states():
    """A mistyped state in a WHERE clause matches nothing and fails silently; this fails loudly."""
    unknown = []
    for path in sorted(SERVICE.rglob("*.py")):
        for column, value in literal_states_in(path.read_text()):
            if value not in ALLOWED[column]:
                unknown.append(f"{path.relative_to(SERVICE.parent)}: {column} '{value}'")
    assert unknown == []


def test_sql_list_and_check_constraint_come_from_the_enum():
    assert states.sql_list(states.JOB_ACTIVE) == "'queued', 'running'"
    check = states.check_in("state", states.TaskState)
    assert str(check.sqltext) == "state IN ('pending', 'leased', 'done', 'failed', 'idle')"
