"""Launch the flmm_grounding node (camera-agnostic) and, optionally, RViz with the shipped config.

    ros2 launch flmm_ros grounding.launch.py
    ros2 launch flmm_ros grounding.launch.py model:=/path/to/bundle device:=cuda \
        image_topic:=/camera/camera/color/image_raw \
        depth_topic:=/camera/camera/aligned_depth_to_color/image_raw \
        camera_info_topic:=/camera/camera/color/camera_info input_qos:=RELIABLE use_rviz:=true

Every parameter lives in params_file (config/grounding.yaml by default); the parameter arguments below
override it only when given. All arguments are checked (flmm_ros.launch_args) before any process starts,
so a bad value or a missing rviz2 starts nothing; when either process exits, the launch shuts down and
takes the other one with it (no orphaned node).
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from flmm_ros.launch_args import (LAUNCH_ARGUMENTS, LOG_LEVELS, NODE_NAME, PARAMETER_ARGUMENTS, QOS_PRESETS,
                                  TOPIC_ARGUMENTS, log_level_argument, normalize_namespace, plan,
                                  write_rviz_config)


def _launch_setup(context):
    names = [*TOPIC_ARGUMENTS.values(), *PARAMETER_ARGUMENTS, *LAUNCH_ARGUMENTS]
    launch_plan = plan({name: LaunchConfiguration(name).perform(context) for name in names})
    # A relative namespace goes under one pushed by an including launch file (PushRosNamespace).
    given = LaunchConfiguration('namespace').perform(context).strip().rstrip('/')
    pushed = context.launch_configurations.get('ros_namespace', '') or ''
    full_namespace = launch_plan.namespace if given.startswith('/') else normalize_namespace(f'{pushed}/{given}')
    node = Node(
        package='flmm_ros',
        executable='flmm_grounding',
        name=NODE_NAME,
        namespace=given or None,
        parameters=[launch_plan.params_file, *([launch_plan.overrides] if launch_plan.overrides else [])],
        remappings=launch_plan.remappings,
        ros_arguments=['--log-level', log_level_argument(full_namespace, launch_plan.log_level)],
        output='screen',
        emulate_tty=True,
        on_exit=Shutdown(reason=f'{NODE_NAME} exited'),
    )
    if not launch_plan.use_rviz:
        return [node]
    rviz = Node(
        package='rviz2',
        executable='rviz2',
        name='rviz2',
        namespace=given or None,
        arguments=['-d', write_rviz_config(launch_plan.rviz_config, full_namespace)],
        on_exit=Shutdown(reason='rviz2 exited'),
    )
    return [node, rviz]


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
        DeclareLaunchArgument('clicked_point_topic', default_value='/clicked_point',
                              description="geometry_msgs/PointStamped to ask about (RViz's Publish Point tool)."),
        DeclareLaunchArgument('params_file', default_value=PathJoinSubstitution([share, 'config', 'grounding.yaml']),
                              description='Node parameters (YAML).'),
        DeclareLaunchArgument('model', default_value='',
                              description='Model bundle dir or LLaVA id/path (empty: from params_file).'),
        DeclareLaunchArgument('mask_head', default_value='',
                              description='F-LMM mask-head checkpoint (empty: from params_file).'),
        DeclareLaunchArgument('backend', default_value='',
                              description='SAM refiner + mask head runtime auto | torch | onnxruntime | tensorrt '
                                          '(empty: from params_file).'),
        DeclareLaunchArgument('device', default_value='', description='cpu | cuda | cuda:N (empty: from params_file).'),
        DeclareLaunchArgument('use_3d', default_value='',
                              description='true | false: 3D from depth + camera_info (empty: from params_file).'),
        DeclareLaunchArgument('input_qos', default_value='', choices=['', *QOS_PRESETS],
                              description='QoS of image/depth/camera_info: RELIABLE for a reliable camera driver '
                                          '(empty: from params_file).'),
        DeclareLaunchArgument('autostart', default_value='',
                              description='true | false: configure and activate the lifecycle node at start; false '
                                          'waits for `ros2 lifecycle set` (empty: from params_file).'),
        DeclareLaunchArgument('use_rviz', default_value='false',
                              description='true | false: start RViz with rviz_config (refused when rviz2 is missing).'),
        DeclareLaunchArgument('rviz_config', default_value=PathJoinSubstitution([share, 'rviz', 'grounding.rviz']),
                              description='RViz configuration; its /flmm_grounding/... topics follow namespace.'),
        DeclareLaunchArgument('log_level', default_value='info', choices=[*LOG_LEVELS, *map(str.upper, LOG_LEVELS)],
                              description="Level of the node's logger (rcl/rmw stay at info)."),
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_launch_setup)])
