"""Launch the flmm_grounding node (camera-agnostic) and, optionally, RViz with the shipped config.

    ros2 launch flmm_ros grounding.launch.py
    ros2 launch flmm_ros grounding.launch.py model:=/path/to/bundle device:=cuda \
        image_topic:=/camera/camera/color/image_raw \
        depth_topic:=/camera/camera/aligned_depth_to_color/image_raw \
        camera_info_topic:=/camera/camera/color/camera_info use_rviz:=true

Every parameter lives in params_file (config/grounding.yaml by default); the parameter arguments below
override it only when given.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

# Node topic -> the launch argument naming what it is remapped to.
TOPIC_ARGUMENTS = {
    'image': 'image_topic',
    'depth': 'depth_topic',
    'camera_info': 'camera_info_topic',
    'instruction': 'instruction_topic',
}
# Launch arguments handed to the node as parameters of the same name (when not empty): name -> type.
PARAMETER_ARGUMENTS = {
    'model': str,
    'mask_head': str,
    'backend': str,
    'device': str,
    'use_3d': bool,
}


def _parameter_value(text: str, kind: type):
    if kind is bool:
        return text.strip().lower() in ('true', '1', 'yes', 'on')
    return text


def _grounding_node(context):
    overrides = {}
    for name, kind in PARAMETER_ARGUMENTS.items():
        text = LaunchConfiguration(name).perform(context)
        if text != '':
            overrides[name] = _parameter_value(text, kind)
    return [Node(
        package='flmm_ros',
        executable='flmm_grounding',
        name='flmm_grounding',
        namespace=LaunchConfiguration('namespace'),
        parameters=[LaunchConfiguration('params_file'), overrides],
        remappings=[(topic, LaunchConfiguration(argument)) for topic, argument in TOPIC_ARGUMENTS.items()],
        arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level')],
        output='screen',
        emulate_tty=True,
    )]


def generate_launch_description():
    share = FindPackageShare('flmm_ros')
    arguments = [
        DeclareLaunchArgument('namespace', default_value='', description='Namespace of the node and its topics.'),
        DeclareLaunchArgument('image_topic', default_value='image', description='Colour image topic (rgb8/bgr8/...).'),
        DeclareLaunchArgument('depth_topic', default_value='depth',
                              description='Depth image aligned to the colour image (16UC1 mm or 32FC1 m).'),
        DeclareLaunchArgument('camera_info_topic', default_value='camera_info',
                              description='CameraInfo of the (aligned) depth / colour image.'),
        DeclareLaunchArgument('instruction_topic', default_value='instruction',
                              description='std_msgs/String instructions.'),
        DeclareLaunchArgument('params_file', default_value=PathJoinSubstitution([share, 'config', 'grounding.yaml']),
                              description='Node parameters (YAML).'),
        DeclareLaunchArgument('model', default_value='',
                              description='Model bundle dir or LLaVA id/path (empty: from params_file).'),
        DeclareLaunchArgument('mask_head', default_value='',
                              description='F-LMM mask-head checkpoint (empty: from params_file).'),
        DeclareLaunchArgument('backend', default_value='',
                              description='SAM refiner backend torch | onnxruntime | tensorrt (empty: from params_file).'),
        DeclareLaunchArgument('device', default_value='', description='cpu | cuda | cuda:N (empty: from params_file).'),
        DeclareLaunchArgument('use_3d', default_value='',
                              description='true | false: 3D from depth + camera_info (empty: from params_file).'),
        DeclareLaunchArgument('use_rviz', default_value='false', description='Start RViz with rviz_config.'),
        DeclareLaunchArgument('rviz_config', default_value=PathJoinSubstitution([share, 'rviz', 'grounding.rviz']),
                              description='RViz configuration file.'),
        DeclareLaunchArgument('log_level', default_value='info', description='debug | info | warn | error.'),
    ]
    rviz = Node(
        package='rviz2',
        executable='rviz2',
        name='rviz2',
        namespace=LaunchConfiguration('namespace'),
        arguments=['-d', LaunchConfiguration('rviz_config')],
        condition=IfCondition(LaunchConfiguration('use_rviz')),
    )
    return LaunchDescription([*arguments, OpaqueFunction(function=_grounding_node), rviz])
