"""checks/runner.py ``_Lockstep``: the next layer is read in a background thread while this one is built, but never
from the stream being built: a stream's read and build share its kept-as-stored weights (compress/stream.py
``_kept``), and a candidate streamed past the reference's layers had its layer i+1 read into them while layer i was
built from them (its figures drifted from run to run, sometimes NaN)."""

from __future__ import annotations

import threading
import time

from moepress.checks.runner import _Lockstep


class _Stream:
    def __init__(self, name: str, log: list):
        self.name, self.log, self.building = name, log, False

    def read_layer_state(self, i):
        self.log.append((self.name, "read", i, self.building))  # the build in progress at this read
        time.sleep(0.01)
        return i

    def build_layer(self, i, state):
        self.building = True
        time.sleep(0.05)  # the background read of the next layer has every chance to start meanwhile
        self.building = False
        return (self.name, i, threading.get_ident())


def test_a_stream_is_never_read_while_it_builds_and_the_other_stream_is_read_ahead():
    log: list = []
    ref, cand = _Stream("ref", log), _Stream("cand", log)
    order = [(ref, 0), (cand, 0), (ref, 1), (cand, 1), (cand, 2), (cand, 3)]  # the candidate has two layers more
    got = [(sm.name, i, layer[:2]) for sm, i, layer in _Lockstep(order)]
    assert got == [(sm.name, i, (sm.name, i)) for sm, i in order]
    assert [(n, i) for n, _, i, _ in log] == [(sm.name, i) for sm, i in order]
    assert not any(during for *_, during in log), log
