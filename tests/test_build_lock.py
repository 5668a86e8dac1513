"""Model builds and forks: accelerate's empty-weights context patches ``nn.Module`` for the whole
process, so a build in one thread must neither leak meta parameters into another thread's build nor
into a child forked meanwhile (serving checks candidate versions in a forked child)."""

from __future__ import annotations

import multiprocessing
import threading

import torch
from accelerate import init_empty_weights

from model import checkpoint


def _child_builds(conn) -> None:
    conn.send(torch.nn.Linear(2, 2).weight.is_meta)
    conn.close()


def test_a_fork_waits_for_a_build_in_another_thread():
    entered, leave = threading.Event(), threading.Event()

    def build_in_progress() -> None:
        with checkpoint._BUILD_LOCK, init_empty_weights():  # what build_model holds for a meta LM
            entered.set()
            leave.wait(30)

    builder = threading.Thread(target=build_in_progress)
    builder.start()
    assert entered.wait(30)
    threading.Timer(0.5, leave.set).start()  # the build ends while the fork below waits for it
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_builds, args=(sender,))
    child.start()
    sender.close()
    assert receiver.poll(60), "the child never answered"
    child_built_meta = receiver.recv()
    child.join(30)
    builder.join(30)
    assert child_built_meta is False, "the child inherited the empty-weights patch"
    assert not torch.nn.Linear(2, 2).weight.is_meta
