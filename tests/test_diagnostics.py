"""Counters and the DiagnosticArray shape of /diagnostics (no DDS)."""
from std_msgs.msg import Header

from flmm_ros.ros import diagnostics


def test_stats_count_results_by_code_and_latency_percentiles():
    stats = diagnostics.NodeStats()
    for _ in range(3):
        stats.instruction_received()
    for seconds in (0.1, 0.2, 0.3):
        stats.result('', seconds)
    stats.result('busy', 0.0)
    snapshot = stats.snapshot()
    assert snapshot['instructions_received'] == 3 and snapshot['results_succeeded'] == 3
    assert snapshot['results_failed'] == 1 and snapshot['errors_by_code'] == 'busy=1'
    assert snapshot['latency_p50_s'] == '0.200'


def test_empty_stats_and_the_diagnostic_updater_shape():
    snapshot = diagnostics.NodeStats().snapshot()
    assert snapshot['latency_p95_s'] == 'n/a' and snapshot['errors_by_code'] == 'none'
    array = diagnostics.diagnostic_array(Header(), 'flmm_grounding: grounding', 'cpu', diagnostics.WARN,
                                         'no recent image', {'frames_received': 0})
    (status,) = array.status
    assert status.name == 'flmm_grounding: grounding' and status.level == diagnostics.WARN
    assert [(kv.key, kv.value) for kv in status.values] == [('frames_received', '0')]
