"""Receive large best-effort camera images with Fast DDS (no rclpy here: this runs before rclpy.init).

Why: on one machine Fast DDS sends a sample to a local reader through shared memory, out of the *writer's*
segment, 512 KiB by default. A best-effort sample larger than that (640x480 rgb8 is 900 KiB, 16UC1 depth
600 KiB) never arrives whole: its fragments overwrite each other in the segment, and best effort does not
resend them. A reliable pair recovers by resending, which is why only best-effort cameras lose frames.
The writer's segment belongs to the camera driver, so the node cannot enlarge it. What the node controls is
where its own image readers listen: with a reader profile named after the topic that gives the reader its
own UDP locator, the writer sends that topic over UDP (loopback on one machine) into a socket with a
4 MiB receive buffer, and whole frames arrive (measured: 141-150 of 150 frames at 30 Hz; before: 0).

The profile file is written before the DDS participant exists (Fast DDS reads it once per process) and
names the fully resolved topics, which are predicted from the `--ros-args` remapping rules the way rcl
applies them; the node checks the prediction once it exists. It is skipped when the middleware is not
Fast DDS, when the user supplies their own profile (FASTDDS_DEFAULT_PROFILES_FILE or
FASTRTPS_DEFAULT_PROFILES_FILE), or when FLMM_LARGE_IMAGE_TRANSPORT=off.
"""
from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path
from xml.sax.saxutils import quoteattr

PROFILE_ENV = 'FASTDDS_DEFAULT_PROFILES_FILE'
USER_PROFILE_ENVS = (PROFILE_ENV, 'FASTRTPS_DEFAULT_PROFILES_FILE')
SWITCH_ENV = 'FLMM_LARGE_IMAGE_TRANSPORT'
RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
RMEM_MAX_FILE = Path('/proc/sys/net/core/rmem_max')

_PROFILE = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by flmm_ros (flmm_ros/ros/transport.py): image readers listen on UDP with a large buffer. -->
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <transport_descriptors>
      <transport_descriptor>
        <transport_id>flmm_large_udp</transport_id>
        <type>UDPv4</type>
        <receiveBufferSize>{buffer}</receiveBufferSize>
        <maxInitialPeersRange>32</maxInitialPeersRange>
      </transport_descriptor>
    </transport_descriptors>
    <participant profile_name="flmm_participant" is_default_profile="true">
      <rtps>
        <userTransports><transport_id>flmm_large_udp</transport_id></userTransports>
      </rtps>
    </participant>
{readers}
  </profiles>
</dds>
"""
_READER = """    <data_reader profile_name={name}>
      <unicastLocatorList>
        <locator><udpv4><address>0.0.0.0</address></udpv4></locator>
      </unicastLocatorList>
    </data_reader>"""


def _ros_args(argv: list[str]) -> list[str]:
    """The tokens inside --ros-args ... [--] sections."""
    tokens, inside = [], False
    for token in argv:
        if token == '--ros-args':
            inside = True
        elif token == '--':
            inside = False
        elif inside:
            tokens.append(token)
    return tokens


def _remap_rules(argv: list[str]) -> list[str]:
    tokens = _ros_args(argv)
    return [tokens[i + 1] for i, token in enumerate(tokens[:-1]) if token in ('-r', '--remap')]


def _expand(name: str, namespace: str, node_name: str) -> str:
    if name.startswith('/'):
        return name
    if name.startswith('~'):
        return f"{namespace.rstrip('/')}/{node_name}{name[1:]}"
    return f"{namespace.rstrip('/')}/{name}"


def resolved_topic(name: str, argv: list[str], node_name: str, namespace: str = '/') -> str:
    """`name` as rcl resolves it for node `node_name` under the remapping rules in `argv` (first match wins)."""
    rules = []
    for rule in _remap_rules(argv):
        left, sep, target = rule.partition(':=')
        target_node, _, source = left.rpartition(':')   # "node:from:=to" applies to that node only
        if not sep or (target_node and target_node != node_name):
            continue
        if source == '__ns':
            namespace = target if target.startswith('/') else '/' + target
        elif source in ('__node', '__name'):
            node_name = target
        else:
            rules.append((source, target))
    expanded = _expand(name, namespace, node_name)
    for source, target in rules:
        if _expand(source, namespace, node_name) == expanded:
            return _expand(target, namespace, node_name)
    return expanded


def profile_xml(topics: list[str]) -> str:
    readers = "\n".join(_READER.format(name=quoteattr(topic)) for topic in topics)
    return _PROFILE.format(buffer=RECEIVE_BUFFER_BYTES, readers=readers)


def socket_buffer_note() -> str:
    """A hint when the kernel caps socket buffers below what the profile asks for, else ''."""
    try:
        rmem_max = int(RMEM_MAX_FILE.read_text())
    except (OSError, ValueError):
        return ''
    if rmem_max >= RECEIVE_BUFFER_BYTES:
        return ''
    return (f"the kernel caps UDP receive buffers at {rmem_max} bytes (net.core.rmem_max); large best-effort "
            f"images may still be lost: `sudo sysctl -w net.core.rmem_max={RECEIVE_BUFFER_BYTES}`")


def configure_large_image_transport(argv: list[str], topics: tuple[str, ...], node_name: str) -> str:
    """Write and select the profile for the resolved `topics`; returns what was done, for the log."""
    rmw = os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    if os.environ.get(SWITCH_ENV, '').lower() in ('0', 'off', 'false', 'no'):
        return f"large-image transport off ({SWITCH_ENV})"
    if not rmw.startswith('rmw_fastrtps'):
        return f"large-image transport not needed with {rmw}"
    user = next((env for env in USER_PROFILE_ENVS if os.environ.get(env)), None)
    if user:
        return f"using your Fast DDS profile ({user}={os.environ[user]}); large-image transport not added"
    resolved = [resolved_topic(topic, argv, node_name) for topic in topics]
    handle, path = tempfile.mkstemp(prefix='flmm_fastdds_', suffix='.xml')
    with os.fdopen(handle, 'w') as out:
        out.write(profile_xml(resolved))
    atexit.register(lambda: Path(path).unlink(missing_ok=True))
    os.environ[PROFILE_ENV] = path
    return f"large-image transport (UDP, {RECEIVE_BUFFER_BYTES >> 20} MiB buffer) for {', '.join(resolved)}"
