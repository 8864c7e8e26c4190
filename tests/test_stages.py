"""Stage names: one tuple (grounding/stages.py) that the code and the messages' comments agree with."""
import ast
import re
from pathlib import Path

from flmm_ros.grounding.stages import ENCODE_STAGES, INSTRUCTION_STAGES, PIPELINE_STAGES, TRACKING_STAGES

PACKAGE = Path(__file__).resolve().parents[1] / 'ros_ws' / 'src' / 'flmm_ros' / 'flmm_ros'
MSGS = Path(__file__).resolve().parents[1] / 'ros_ws' / 'src' / 'flmm_msgs'
NODE_FEEDBACK = ('queued', 'encode', 'objects', 'publish')   # the node's own feedback stages
NODE_TIMINGS = ('depth_3d',)


def timed_stages_in_code() -> set[str]:
    """Every string literal passed to a `stage(...)` call in the grounding core."""
    names = set()
    for path in (PACKAGE / 'grounding').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, 'attr', getattr(node.func, 'id', None)) == 'stage':
                names |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return names


def quoted_in_comment(path: Path, start: str) -> list[str]:
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    comment = []
    for line in lines[first:]:
        if not line.startswith('#'):
            break
        comment.append(line)
    return re.findall(r'"([a-z_0-9]+)"', ' '.join(comment))


def test_the_code_times_exactly_the_declared_stages():
    assert timed_stages_in_code() == set(PIPELINE_STAGES) | set(TRACKING_STAGES)
    assert set(ENCODE_STAGES).isdisjoint(INSTRUCTION_STAGES)


def test_the_result_message_comment_names_every_timed_stage():
    named = quoted_in_comment(MSGS / 'msg' / 'GroundingResult.msg', '# Latency per pipeline stage')
    assert named == [*PIPELINE_STAGES, *NODE_TIMINGS]


def test_the_action_feedback_comment_names_every_feedback_stage():
    named = quoted_in_comment(MSGS / 'action' / 'Ground.action', '# Feedback')
    masks, answer = INSTRUCTION_STAGES[:-1], INSTRUCTION_STAGES[-1:]   # the node publishes masks before the answer
    assert answer == ('answer',)
    assert named == ['queued', 'encode', *masks, 'objects', *answer, 'publish']


def test_the_tracks_message_comment_names_every_tracking_stage():
    named = quoted_in_comment(MSGS / 'msg' / 'TrackedObjects.msg', '# Seconds per tracking stage')
    assert named == [*TRACKING_STAGES, *NODE_TIMINGS]
