"""Entry point of the flmm_grounding node: process start-up and an orderly shutdown on Ctrl-C / SIGTERM.

    ros2 run flmm_ros flmm_grounding --ros-args --params-file config/grounding.yaml
    python -m flmm_ros.ros.node --ros-args -p model:=/path/to/bundle -r image:=/camera/color/image_raw

The node itself is flmm_ros.ros.grounding_node.GroundingNode. This module imports only the standard library at
the top, so that the signal handlers are in place before the slow imports (torch, transformers): a signal during
them ends the process quietly once they are done, one during the model load as below. rclpy's own signal
handlers are not installed: they invalidate the ROS context at once, under the running worker. Instead SIGINT
and SIGTERM set an event; the main thread then, in order,
1. stops accepting, answers every queued and running instruction and action goal with 'shutdown' (the
   executor still spins in its thread, so the results are sent), and waits for the publishers' acks;
2. stops the executor, destroys the node and shuts rclpy down.
Exit status: 0 after a signal or a clean end, 1 when the model could not be loaded, 2 for bad parameters.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1          # linux/prctl.h
SHUTDOWN_TIMEOUT_S = 3.0      # ros2 launch escalates to SIGTERM after 5 s and SIGKILL after 10 s
ACTION_FLUSH_S = 0.3          # action results go out as service responses, which have no ack to wait for


def main(args: list[str] | None = None) -> int:
    argv = list(args if args is not None else sys.argv)
    stop = threading.Event()
    # The handler only sets the event. Raising from it instead would land inside whatever code runs at that
    # moment (an import, a library call), and code that catches BaseException would carry on: the node then
    # outlived a killed `ros2 launch` now and then. Start-up checks the event after its slow steps.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    _end_with_launch()
    return _run(argv, stop)


def _end_with_launch() -> None:
    """Under `ros2 launch`, ask the kernel to send SIGTERM when the launch process dies. Launch forwards SIGINT
    to its processes, but a launch that is itself killed (SIGTERM from systemd or a container runtime, SIGKILL)
    would leave this node running as an orphan, serving a camera nobody listens to (Linux only)."""
    parent = os.getppid()
    try:
        cmdline = Path(f'/proc/{parent}/cmdline').read_bytes().split(b'\0')
    except OSError:
        return
    if not any(part.endswith(b'ros2') for part in cmdline) or b'launch' not in cmdline:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:   # the launch already died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _run(argv: list[str], stop: threading.Event) -> int:
    from flmm_ros.ros.transport import configure_large_image_transport, socket_buffer_note
    transport_note = configure_large_image_transport(argv, ('image', 'depth'), 'flmm_grounding')

    # Heavy imports after the signal handlers (see the module docstring); no progress bars in a node's log.
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    # OpenMP threads that spin while waiting turn a busy robot computer (camera drivers, planners, another
    # model) into a 50-100x slowdown: measured on 2 cores beside one busy process, a cached-frame instruction
    # took 2.2 s with spinning threads and 30 ms with sleeping ones. Must be set before torch loads libgomp.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from flmm_ros.grounding.blas_threads import single_threaded_numpy_blas
    from flmm_ros.grounding.types import GroundingError
    from flmm_ros.ros.executor import SteadyExecutor
    from flmm_ros.ros.grounding_node import NODE_NAME, GroundingNode
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()
    single_threaded_numpy_blas()   # the same for OpenBLAS's pool, which spins after each call (blas_threads.py)
    if stop.is_set():            # a signal during the imports: end quietly, nothing was started
        return 0

    try:
        rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    except Exception as error:  # noqa: BLE001 - e.g. a malformed params file: one line, no traceback
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"[{NODE_NAME}] cannot start: {first_line} (check the --ros-args and the params file)",
              file=sys.stderr)
        return 2
    if stop.is_set():
        rclpy.try_shutdown()
        return 0
    try:
        node = GroundingNode(stop)
    except GroundingError as error:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(error))
        rclpy.try_shutdown()
        return 2
    logger = node.get_logger()
    logger.debug(transport_note)
    if node.image_topic not in transport_note and 'large-image transport (' in transport_note:
        logger.warning(f"{transport_note}, but the image topic resolved to {node.image_topic}: large best-effort "
                       "images may be lost")
    if note := socket_buffer_note():
        logger.warning(note)

    executor = SteadyExecutor(num_threads=4)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name='flmm-executor', daemon=True)
    spinner.start()
    while not stop.wait(timeout=1.0):   # a timed wait keeps the main thread responsive to signals
        pass

    worker_done = node.stop_serving(SHUTDOWN_TIMEOUT_S)
    time.sleep(ACTION_FLUSH_S)
    failed = node.failure is not None
    if not worker_done:
        # The worker or the tracking thread is inside a model load or a stage that cannot be interrupted.
        # Everything is answered; tearing ROS down under a running thread can hang or abort, and interpreter
        # finalisation would abort on the native threads, so end the process here.
        node.get_logger().info('a worker thread is still busy (e.g. loading the model); exiting without it')
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if failed else 0)
    executor.shutdown(timeout_sec=1.0)
    spinner.join(timeout=1.0)
    node.destroy_node()
    rclpy.try_shutdown()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
