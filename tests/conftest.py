"""Shared pytest set-up.

`python -m pytest ... --count N` (pytest-repeat) repeats each test. The real-DDS modules share one node per module
(starting one takes seconds), and their tests rely on a fresh node: the first asks before any frame came, stamps
repeat from run to run. So the repetition number is made a module-scoped fixture here (pytest-repeat's own is
function-scoped), and those modules' node fixtures depend on it: each repetition then runs the whole module against
a node of its own, in order, instead of one test N times against a node the earlier repetitions have changed.
"""
import pytest


@pytest.fixture(scope="module")
def __pytest_repeat_step_number(request):
    """The repetition (0-based) under `--count N`, else None; overrides pytest-repeat's fixture of that name."""
    return getattr(request, "param", None)


@pytest.fixture(scope="module")
def repetition(__pytest_repeat_step_number):
    """Depend on this in a module-scoped fixture to get a new instance per `--count` repetition."""
    return __pytest_repeat_step_number


def pytest_configure(config):
    # Repeat whole modules (pytest-repeat's --repeat-scope module): a module's tests run in their order once per
    # repetition, each repetition with its own module-scoped fixtures (see `repetition`).
    if getattr(config.option, "count", 1) > 1 and getattr(config.option, "repeat_scope", None) == "function":
        config.option.repeat_scope = "module"
