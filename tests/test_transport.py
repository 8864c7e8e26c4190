"""The Fast DDS profile that lets the node's image readers receive large best-effort frames (no DDS here)."""
import xml.etree.ElementTree as ET

import pytest

from flmm_ros.ros import transport
from flmm_ros.ros.transport import configure_large_image_transport, profile_xml, resolved_topic

NODE = 'flmm_grounding'


@pytest.mark.parametrize('argv, expected', [
    ([], '/image'),
    (['--ros-args', '-r', '__ns:=/robot1', '--params-file', 'p.yaml'], '/robot1/image'),
    (['--ros-args', '-r', 'image:=/camera/color/image_raw'], '/camera/color/image_raw'),
    (['--ros-args', '-r', '__ns:=/r', '--remap', 'image:=cam/image'], '/r/cam/image'),
    (['--ros-args', '-r', 'other:image:=/x', '-r', 'flmm_grounding:image:=/y'], '/y'),   # node-specific rules
    (['--ros-args', '-r', 'image:=/first', '-r', 'image:=/second'], '/first'),           # first match wins
    (['-r', 'image:=/not_ros_args', '--ros-args', '--', '-r', 'image:=/after_end'], '/image'),
    (['--ros-args', '-r', '__node:=g2', '-r', 'g2:image:=~/raw'], '/g2/raw'),
])
def test_topics_resolve_like_rcl_remapping(argv, expected):
    assert resolved_topic('image', argv, NODE) == expected


def test_profile_names_each_topic_with_a_udp_reader_locator():
    root = ET.fromstring(profile_xml(['/image', '/cam/depth']))
    ns = {'d': 'http://www.eprosima.com'}
    readers = root.findall('.//d:data_reader', ns)
    assert [r.get('profile_name') for r in readers] == ['/image', '/cam/depth']
    for reader in readers:
        assert reader.find('.//d:udpv4/d:address', ns).text == '0.0.0.0'   # every interface: remote cameras too
    buffer = root.find('.//d:transport_descriptor/d:receiveBufferSize', ns)
    assert int(buffer.text) == transport.RECEIVE_BUFFER_BYTES


def test_the_profile_is_set_only_when_fast_dds_and_the_user_has_none(monkeypatch, tmp_path):
    for env in (*transport.USER_PROFILE_ENVS, transport.SWITCH_ENV, 'RMW_IMPLEMENTATION'):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(transport.tempfile, 'tempdir', str(tmp_path))
    note = configure_large_image_transport(['--ros-args', '-r', '__ns:=/arm'], ('image', 'depth'), NODE)
    path = transport.os.environ[transport.PROFILE_ENV]
    assert '/arm/image' in note and '/arm/depth' in open(path).read()

    monkeypatch.setenv(transport.PROFILE_ENV, '/etc/my_profile.xml')
    assert 'using your Fast DDS profile' in configure_large_image_transport([], ('image',), NODE)
    monkeypatch.delenv(transport.PROFILE_ENV)
    monkeypatch.setenv('RMW_IMPLEMENTATION', 'rmw_cyclonedds_cpp')
    assert 'not needed' in configure_large_image_transport([], ('image',), NODE)
    monkeypatch.setenv('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    monkeypatch.setenv(transport.SWITCH_ENV, 'off')
    assert 'off' in configure_large_image_transport([], ('image',), NODE)
    assert transport.PROFILE_ENV not in transport.os.environ


def test_socket_buffer_note_names_the_sysctl(monkeypatch, tmp_path):
    small = tmp_path / 'rmem_max'
    small.write_text('212992\n')
    monkeypatch.setattr(transport, 'RMEM_MAX_FILE', small)
    assert 'net.core.rmem_max' in transport.socket_buffer_note()
    small.write_text(str(transport.RECEIVE_BUFFER_BYTES))
    assert transport.socket_buffer_note() == ''
