"""The search's parts that need no cluster: its grid, and what Tune must be able to pickle."""

import pickle

from rich.console import Console

from gearbox.compression.progress import SilentProgress
from gearbox.compression.search import _TrialProgress, default_space, draw_points
from gearbox.serving.console import RichProgress
from tests.unit.tiny_model import conv_spec


def test_the_trial_progress_callback_pickles_without_the_terminal_display():
    # Tune pickles its callbacks with the experiment state; the terminal display holds locks.
    spec = conv_spec()
    display = RichProgress(Console(file=None))
    callback = _TrialProgress(display, None, {}, default_space(spec), spec, 1)
    restored = pickle.loads(pickle.dumps(callback))
    assert isinstance(restored._progress, SilentProgress)
    assert callback._progress is display


def test_drawn_points_are_distinct_and_seeded():
    space = default_space(conv_spec())
    points = draw_points(space, 12, seed=3)
    assert len({repr(point) for point in points}) == len(points) == 12
    assert [repr(p) for p in draw_points(space, 12, seed=3)] == [repr(p) for p in points]
    assert len(draw_points(space, 10_000, seed=0)) == len(space.points())
