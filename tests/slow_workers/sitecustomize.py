"""Python imports this module at start-up when its folder is on PYTHONPATH. tests/test_ray.py puts
it there for the `fuyu --ray local` runs it starts: their clusters, and so their Ray workers,
inherit the environment, and each worker's runner then takes 0.4 s more per record: time for the
test to kill a worker, or the driver, in the middle of a part. Other processes are left alone."""

import sys
import time

if sys.argv and sys.argv[0].endswith("default_worker.py"):  # a Ray worker process
    from fuyu.runner import Runner

    _run = Runner.run

    def _slow_run(self, *args, **kwargs):
        for rec in _run(self, *args, **kwargs):
            time.sleep(0.4)
            yield rec

    Runner.run = _slow_run
