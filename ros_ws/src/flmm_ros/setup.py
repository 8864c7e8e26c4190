"""ament_python package flmm_ros: the grounding node, its client, launch/config/RViz files and the embedded model."""
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = 'flmm_ros'
HERE = Path(__file__).parent


def share_files(folder: str) -> list[tuple[str, list[str]]]:
    """(install dir, files) pairs for every file under `folder`, keeping sub-folders."""
    entries: dict[str, list[str]] = {}
    for path in sorted((HERE / folder).rglob('*')):
        if path.is_file() and '__pycache__' not in path.parts:
            rel = path.relative_to(HERE)
            entries.setdefault(str(Path('share', PACKAGE, rel.parent)), []).append(str(rel))
    return sorted(entries.items())


setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test', 'tests']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        *share_files('launch'),
        *share_files('config'),
        *share_files('rviz'),
        *share_files('models'),
    ],
    install_requires=['setuptools'],
    zip_safe=False,
    maintainer='flmm_ros maintainers',
    maintainer_email='maintainers@flmm-ros.dev',
    description='Language grounding (F-LMM) for ROS 2: answer, masks, boxes and grasp targets from an instruction.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'flmm_grounding = flmm_ros.ros.node:main',
            'flmm-ask = flmm_ros.ros.client:main',
        ],
    },
)
