"""What the GUI tests share: a third-party task with no GUI code, and waiting for the job queue."""

import time

from difftool.core.task import Param, Task, TaskResult
from difftool.plugins import hookimpl


class Dial(Task):
    name = "dial"
    summary = "A third-party task with no GUI code"
    params = (
        Param("strength", "float", default=0.4, min=0, max=1, help="how strong"),
        Param("count", "int", default=3, min=1, max=9),
        Param("flip", "bool", default=True),
        Param("style", "choice", default="b", choices=("a", "b")),
    )

    def run(self, request, context):
        for step in range(request.params["count"]):
            context.cancel.raise_if_cancelled()
            time.sleep(0.05)
            context.report(step + 1, request.params["count"])
        return TaskResult([request.inputs["image"].to_pil()], {"size": "x"})


class DialPlugin:
    @hookimpl
    def register_tasks(self, register):
        register(Dial)


def wait_for(queue, qapp, timeout: float = 300.0) -> None:
    """Process events (as the app's event loop would) until no job is queued or running, then flush.

    A job that never ends (a hung worker, a lost signal) fails the test after ``timeout`` seconds instead of
    hanging the suite."""
    deadline = time.monotonic() + timeout

    def check() -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job queue was still busy after {timeout:g} s: running {queue.running!r}")

    while True:
        while not queue.wait(10):
            check()
            qapp.processEvents()
        for _ in range(20):
            qapp.processEvents()
        if queue.running is None and not queue.pending:
            return
        check()
