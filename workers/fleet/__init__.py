"""The fleet: worker replicas placed on Ray and scaled with each teacher's pending work.

`policy` and `settings` are plain Python; `ray_pool` is the only module of the project that
imports Ray (the optional extra `teachercache[ray]`).
"""
