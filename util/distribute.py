"""Independent jobs run in this process or as Ray tasks, one code path for both (`qtc table`, `qtc sweep`).

`run_jobs(fn, jobs, ray_address)` yields (index, result, still_running) as jobs finish: in order in-process, in
completion order on Ray. On Ray each job is a task asking for `resources` (num_cpus, num_gpus, memory); a task
whose worker dies is retried (up to 3 times), so a lost worker costs its own job only. `ray_address`: "local"
starts a cluster on this machine, "auto" joins the one this node is part of, anything else is a cluster address.
Ray is the optional `ray` extra.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

RETRIES = 3


def run_jobs(fn: Callable, jobs: list[tuple], ray_address: str | None = None,
             resources: dict[str, Any] | None = None) -> Iterator[tuple[int, Any, int]]:
    if ray_address is None:
        for index, args in enumerate(jobs):
            yield index, fn(*args), 0
        return
    import ray  # noqa: PLC0415 - the optional `ray` extra

    resources = {key: value for key, value in (resources or {"num_cpus": 1}).items() if value}
    if not ray.is_initialized():
        threads = str(max(1, int(resources.get("num_cpus", 1))))  # each task's ORT sessions: its CPUs' worth
        ray.init(address=None if ray_address == "local" else ray_address, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"QTC_THREADS": threads}})
    task = ray.remote(max_retries=RETRIES, **resources)(fn)
    waiting = {task.remote(*args): index for index, args in enumerate(jobs)}
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1)
        index = waiting.pop(ready[0])
        yield index, ray.get(ready[0]), len(waiting)
