"""Typed request parameters shared by the routes: ids that must be well formed.

A malformed id in the path is answered 404 `not_found` naming the parameter, exactly like an
id that does not exist (errors.py), so probing with `../` or `%00` tells nothing; in a query
or a body it is a 422 naming the field.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, params

from service.ids import id_pattern


def path_id(kind: str) -> params.Path:
    return params.Path(pattern=id_pattern(kind), description=f"a {kind} id, as the API returned it")


JobId = Annotated[str, path_id("job")]
ShardId = Annotated[str, path_id("shard")]
FileId = Annotated[str, path_id("file")]
BatchId = Annotated[str, path_id("batch")]
JobCursor = Annotated[str | None, Query(pattern=id_pattern("job"), description="the last job id of the previous page")]
BatchCursor = Annotated[str | None, Query(pattern=id_pattern("batch"),
                                          description="the last batch id of the previous page")]
FileCursor = Annotated[str | None, Query(pattern=id_pattern("file"), description="the last file id of the previous page")]
