"""
A thread pool and reactor that run the store's disk jobs inline, so a store benchmark times
the disk work alone, in one thread.
"""

from twisted.python.failure import Failure


class Pool:
    """Runs each job at once, in the calling thread."""

    def callInThreadWithCallback(self, on_result, func, *args, **kwargs):
        try:
            r = func(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, r)


class Reactor:
    """Calls back at once, in the calling thread."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def result(d):
    """The result of a Deferred that has fired (raises its failure)."""
    out = []
    d.addBoth(out.append)
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]
