"""Long C calls on a helper thread, so that the calling thread stays responsive to Ctrl-C and to close().

A C call cannot be interrupted by a signal: Python runs its signal handlers only between bytecodes of the main thread.
So the call runs on a helper thread and the caller waits for it in short steps. When the caller must stop it (Ctrl-C,
or close() from another thread), `stop()` climbs a bounded ladder: ask the call to abort (it then rolls its work back
itself), wait a moment; close the connections to the workers it may be waiting on (it then fails at once, and the
context is dead), wait a moment; else leave it running and say so ("abandoned"): its thread frees what it used when
it returns (`when_done`).
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

# How long each step of stop() waits for the call: abort, then disconnect. Ctrl-C returns within about twice this.
STOP_GRACE_S = 0.5

# Test hook: called with a point name ("start", "started", "finished") and the call, on the thread that waits for it
# in run_guarded; a test makes it raise KeyboardInterrupt to land an interrupt exactly there (tests/test_interrupts.py).
test_hook: Callable[[str, "BackgroundCall"], None] | None = None


def _hook(point: str, call: "BackgroundCall") -> None:
    if test_hook is not None:
        test_hook(point, call)


class BackgroundCall:
    """fn() on its own thread. States: new -> running -> done, or new -> cancelled (fn never ran)."""

    def __init__(self, fn: Callable[[], Any], name: str = "pyturbo-call"):
        self._fn = fn
        self._lock = threading.Lock()
        self._state = "new"
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._then: list[Callable[[], None]] = []
        self.thread = threading.Thread(target=self._target, name=name, daemon=True)

    def _target(self) -> None:
        with self._lock:
            if self._state == "cancelled":
                return
            self._state = "running"
        try:
            self._value = self._fn()
        except BaseException as e:  # handed to the caller by result()
            self._error = e
        finally:
            with self._lock:
                self._state, then, self._then = "done", self._then, []
            self._done.set()
            for fn in then:
                _run_quietly(fn)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def start(self) -> None:
        self.thread.start()

    def cancel_if_not_started(self) -> bool:
        """True if fn had not started and now never will."""
        with self._lock:
            if self._state == "new":
                self._state = "cancelled"
                self._done.set()
                return True
            return False

    def wait(self, stop_when: Callable[[], bool] | None = None, poll: float = 0.05) -> bool:
        """Wait until done (True) or until stop_when() is true (False). KeyboardInterrupt goes through."""
        while not self._done.wait(poll):
            if stop_when is not None and stop_when():
                return False
        return True

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def when_done(self, fn: Callable[[], None]) -> None:
        """Run fn once the call has returned: now if it has, else on its thread when it does."""
        with self._lock:
            if self._state in ("new", "running"):
                self._then.append(fn)
                return
        _run_quietly(fn)

    def stop(self, abort: Callable[[], None], disconnect: Callable[[], None], grace: float = STOP_GRACE_S) -> str:
        """Make a started call return: 'finished' (it returned after abort), 'disconnected' (only once its workers
        were disconnected) or 'abandoned' (still running). More Ctrl-C meanwhile are absorbed: this takes at most
        2 * grace."""
        if self._wait_steadily(grace, abort):
            return "finished"
        disconnect()
        if self._wait_steadily(grace, None):
            return "disconnected"
        return "abandoned"

    def _wait_steadily(self, seconds: float, nudge: Callable[[], None] | None) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            try:
                if nudge is not None:
                    nudge()  # again and again: a call that was just starting may have cleared an earlier request
                if self._done.wait(min(0.02, max(0.0, deadline - time.monotonic()))):
                    return True
                if time.monotonic() >= deadline:
                    return False
            except KeyboardInterrupt:
                continue


class InterruptGuard:
    """Ctrl-C around one call on a context, on the main thread (where Python raises KeyboardInterrupt).

    Until the call's work has settled, Ctrl-C raises as usual (the handler that was installed runs). From the moment
    the C call has returned, or the first Ctrl-C is being handled, until the call returns to its caller, a Ctrl-C is
    only recorded: raised there, it would report as interrupted a call that completed (or leave a call running while
    it is being stopped). The caller turns a recorded Ctrl-C into one raised by the next call (Context._claim)."""

    def __init__(self):
        self.settled = False
        self.recorded = False
        self._prev = None

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGINT)
            if callable(prev):
                self._prev = prev
                signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.settled:
            self.recorded = True
        else:
            self._prev(signum, frame)

    def __exit__(self, *exc) -> None:
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)


def run_guarded(call: BackgroundCall, abort: Callable[[], None], disconnect: Callable[[], None],
                stop_when: Callable[[], bool] | None = None,
                guard: InterruptGuard | None = None) -> tuple[str, KeyboardInterrupt | None]:
    """Start call and wait for it. Returns (how, interrupt): how is 'finished' when it returned, 'not-started' (fn
    never ran), or what stop() said when a Ctrl-C (then interrupt is it) or stop_when() made the caller stop it.
    guard: settled once the outcome no longer depends on a Ctrl-C."""
    guard = guard or InterruptGuard()
    guard.settled = False
    try:
        _hook("start", call)
        call.start()  # inside the try: a Ctrl-C during start() must not leave the call running unnoticed
        _hook("started", call)
        finished = call.wait(stop_when)
        guard.settled = True
        _hook("finished", call)
    except KeyboardInterrupt as ki:
        guard.settled = True
        return _stop(call, abort, disconnect), ki
    if finished:
        return "finished", None
    return _stop(call, abort, disconnect), None


def _stop(call: BackgroundCall, abort, disconnect) -> str:
    if call.cancel_if_not_started():
        return "not-started"
    if call.done:
        return "finished"
    return call.stop(abort, disconnect)


def run_or_undo(fn: Callable[[], Any], undo: Callable[[Any], None], disconnect: Callable[[], None]) -> Any:
    """fn() makes something (loads a model, creates a context, connects). A Ctrl-C meanwhile leaves nothing behind:
    undo(what fn returned) runs (now, or when an abandoned fn returns) and KeyboardInterrupt is raised."""
    call = BackgroundCall(fn, "pyturbo-wait")
    how, interrupt = run_guarded(call, abort=lambda: None, disconnect=disconnect)
    if interrupt is None:
        return call.result()
    call.when_done(lambda: call._error is None and call._value and undo(call._value))
    stopped = {"disconnected": " (its RPC workers had to be disconnected: the model is dead)",
               "abandoned": " (it is still finishing in the background and will be freed then)"}.get(how, "")
    raise KeyboardInterrupt(f"interrupted: nothing was created{stopped}") from interrupt


def _run_quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # a cleanup on a helper thread has nobody to report to
        pass
