"""The work split (nbbn/_engine.py's plans) for 1 to 64 threads, in pure
Python (nothing compiles): over the bench shapes and every layout, a plan
gives every team at least two balanced tasks a thread, a team only as large
as the input pays for (a forward's half as large as a backward's), and task boundaries that no thread count changes (so
the bits do not change either; tests/test_threads.py runs the kernels)."""
import math

import numpy as np
import pytest

from nbbn import _engine
from nbbn.programs.bench import DEFAULT_SHAPES

THREADS = (1, 2, 4, 8, 16, 32, 64)
#: (shape, axis): the bench's shapes, the issue's (256, 512), (64, 128) and
#: channels-last, and 3-D/5-D shapes of both layouts.
CASES = sorted({(s, 1) for s in DEFAULT_SHAPES} | {
    ((256, 512), 1), ((64, 128), 1), ((1024, 512), 1), ((65536, 1024), 1), ((64, 100000), 1),
    ((32, 28, 28, 256), -1), ((64, 112, 112, 64), -1), ((8, 32, 32, 16), -1),
    ((256, 256, 28, 28), 1), ((2, 3, 40000), 1), ((1, 1, 1 << 22), 1), ((64, 64, 40), 1),
    ((16, 8, 4, 8, 8), 1), ((4, 6, 8, 10, 32), -1), ((3, 5, 7), 1), ((128, 256, 7), 1),
    ((32, 512, 4, 4), 1), ((16, 2048, 2, 2), 1), ((64, 1024, 3, 3), 1), ((64, 8192), 1),
    ((16, 40000), 1), ((2, 8192, 3, 3), 1)})


def _fields(layout):
    return tuple(np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for v in layout)


@pytest.mark.parametrize("shape,axis", CASES)
def test_plans_for_1_to_64_threads(shape, axis):
    layout = _engine.layout_of(shape, axis, 4)
    work = math.prod(shape)
    assert sum(layout.counts) * layout.channels == work
    assert 1 <= layout.max_team <= max(1, work // _engine.GRAIN)
    for threads in THREADS:
        team = layout.team(threads)
        assert team == min(threads, layout.max_team)
        tasks = _engine.tasks_of(layout, team)
        assert sum(tasks) == work  # the tasks cover the input once
        # A forward (one array read per value) gives each thread twice the values.
        forward = layout.team(threads, _engine.FORWARD_GRAIN)
        assert forward == max(1, min(team, work // _engine.FORWARD_GRAIN))
        if forward > 1:
            assert len(_engine.tasks_of(layout, forward)) >= 2 * forward
        if team == 1:  # serial: rows in one task; planes span by span
            assert len(tasks) == 1 or layout.planes or not layout.serial
            continue
        # Every thread gets a grain of work, and at least two tasks to balance.
        assert work / team >= _engine.GRAIN
        assert len(tasks) >= 2 * team, (threads, len(tasks))
        # Balanced: tasks differ by less than a quarter (by a few elements of
        # a plane's last chunk, a row of a chunk of rows, a channel of a block).
        assert max(tasks) <= 1.25 * min(tasks), (threads, max(tasks), min(tasks))
        if layout.planes:
            assert min(tasks) >= min(layout.view[2], _engine.PLANE_CHUNK // 2)
        else:
            assert min(tasks) >= _engine.GRAIN // 4
            assert layout.view[0] // layout.parts >= min(layout.view[0], _engine.MIN_ROWS)
    if layout.planes:
        assert layout.chunk <= _engine.PLANE_CHUNK
    elif not layout.serial:
        # Partial states merged serially stay small, unless tasks that fit
        # in a core's L2 need more.
        tasks = _engine.tasks_of(layout, layout.max_team)
        assert (layout.parts * layout.channels <= _engine.MAX_STATES
                or max(tasks) <= _engine.ROW_CHUNK)


@pytest.mark.parametrize("shape,axis", CASES)
def test_what_decides_the_bits_is_the_same_for_every_team(shape, axis):
    """The chunks whose partial states are merged (planes: spans of a plane;
    rows: chunks of rows) are the same for every team; blocks of channels
    and a task per channel, which a team may add, only split independent
    columns or whole channels."""
    layout = _engine.layout_of(shape, axis, 4)
    for threads in THREADS:
        team = layout.team(threads)
        tasks = _engine.tasks_of(layout, team)
        if layout.planes and not layout.by_channel_for(team):
            assert tasks == _engine.tasks_of(layout, 1) or layout.serial
        if not layout.planes:
            blocks = layout.blocks_for(team)
            assert len(tasks) == layout.parts * blocks
            per_part = [sum(tasks[p * blocks:(p + 1) * blocks]) for p in range(layout.parts)]
            assert per_part == [c * layout.channels for c in layout.counts]


@pytest.mark.parametrize("shape,axis", CASES)
def test_plans_do_not_depend_on_the_thread_count(shape, axis, monkeypatch):
    """Neither numba's thread count nor its maximum enters a plan: a thread
    count set between calls cannot meet a stale plan (only the team, chosen
    per call, depends on it)."""
    numba = pytest.importorskip("numba")
    plans = []
    for threads in (1, 64):
        monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", threads)
        monkeypatch.setattr(numba, "get_num_threads", lambda: threads)
        plans.append(_fields(_engine.layout_of.__wrapped__(shape, axis, 4)))
    assert plans[0] == plans[1]
    assert plans[0] == _fields(_engine.layout_of(shape, axis, 4))


def test_the_issue_shapes():
    """What the issue measured: (256, 512) was 2 tasks whatever the thread
    count, (4096, 1024) 32 chunks of rows, 2 a thread at 16 threads."""
    small = _engine.layout_of((256, 512), 1, 4)
    assert small.max_team == 4
    assert [len(_engine.tasks_of(small, small.team(t))) for t in (2, 4, 16)] == [4, 8, 8]
    assert [small.team(t, _engine.FORWARD_GRAIN) for t in (1, 2, 16)] == [1, 2, 2]
    assert _engine.layout_of((128, 512), 1, 4).team(16, _engine.FORWARD_GRAIN) == 1
    mid = _engine.layout_of((4096, 1024), 1, 4)
    assert [len(_engine.tasks_of(mid, mid.team(t))) for t in (2, 16, 32, 64)] == [32, 32, 64, 128]
    assert _engine.layout_of((64, 128), 1, 4).serial
    assert _engine.layout_of((32, 28, 28, 256), -1, 4).parts == 128


class _Rows:
    """What the kernels' split functions read of a rows view: its shape."""

    def __init__(self, view):
        self.shape = view


@pytest.mark.parametrize("shape,axis", CASES)
def test_output_passes_give_every_thread_two_tasks(shape, axis):
    """The rows layout's output passes: the forward's a row a task, the input
    gradient's four rows a task, each cut into blocks of columns where they
    are long (what the kernels compute, run here in Python): at least two
    tasks a thread of every team (the late, wide stages of a CNN, (32, 512,
    4, 4), had one task a thread of 8 before the input gradient's blocks of
    columns, and (64, 100000) a forward task a thread of 64 before the
    forward's)."""
    kernels = pytest.importorskip("nbbn.kernels")
    layout = _engine.layout_of(shape, axis, 4)
    if layout.planes:
        return  # a task per span of a plane, as the statistics (above)
    rows = _Rows(layout.view)
    # (passes by channel runs have tasks of RUN_TASK values whatever the rows)
    for task_rows, grain, shortest_run in ((4, _engine.GRAIN, 2 * kernels.RUN_MIN),
                                           (1, _engine.FORWARD_GRAIN, kernels.RUN_MIN)):
        by_runs = kernels._rows_by_runs.py_func(rows, layout.inner, shortest_run)
        blocks, span = kernels._column_blocks.py_func(rows, task_rows)
        assert (blocks - 1) * span < layout.view[1] <= blocks * span and span % 16 == 0
        assert task_rows * span <= kernels.ROW_TASK or blocks == 1
        tasks = -(-layout.view[0] // task_rows) * blocks
        for threads in THREADS:
            team = layout.team(threads, grain)
            if team > 1 and not by_runs:
                assert tasks >= 2 * team, (threads, task_rows, tasks)

