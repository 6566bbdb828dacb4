"""The task queue: leases, fencing tokens, completion and failure of teacher work."""
