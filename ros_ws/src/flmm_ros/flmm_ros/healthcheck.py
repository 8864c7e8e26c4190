"""Container health check: is the flmm_grounding node in the ROS graph?

    python -m flmm_ros.healthcheck [--namespace /robot1] [--timeout 10]

Exit 0 when a node of that name (in that namespace, or any when none is given) is discovered within
the timeout, else 1 with what was seen. Uses the container's ROS_DOMAIN_ID / discovery settings.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from flmm_ros.launch_args import NODE_NAME, normalize_namespace


def matches(found: list[tuple[str, str]], name: str, namespace: str | None) -> bool:
    """`found` holds (name, namespace) pairs as rclpy reports them ('/' for the root namespace)."""
    return any(n == name and (namespace is None or (ns.rstrip('/') or '') == namespace) for n, ns in found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--namespace', default=os.environ.get('FLMM_NAMESPACE'),
                        help='namespace of the node (default: $FLMM_NAMESPACE, else any)')
    parser.add_argument('--name', default=NODE_NAME)
    parser.add_argument('--timeout', type=float, default=10.0, help='seconds to wait for discovery')
    args = parser.parse_args(argv)
    namespace = None if args.namespace is None else normalize_namespace(args.namespace)

    import rclpy
    from rclpy.context import Context
    from rclpy.node import Node

    context = Context()
    rclpy.init(args=[], context=context)
    node = Node('flmm_healthcheck', context=context, start_parameter_services=False)
    found: list[tuple[str, str]] = []
    try:
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            found = node.get_node_names_and_namespaces()
            if matches(found, args.name, namespace):
                print(f"healthy: {namespace or ''}/{args.name} is running")
                return 0
            time.sleep(0.2)  # discovery is asynchronous; poll the graph cache
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    others = ', '.join(f"{ns.rstrip('/')}/{n}" for n, ns in found if n != 'flmm_healthcheck') or 'none'
    print(f"unhealthy: no node {namespace or '(any namespace)'}/{args.name} within {args.timeout:.0f} s "
          f"(nodes seen: {others})")
    return 1


if __name__ == '__main__':
    sys.exit(main())
