"""The README's demo: the real node on the embedded default model, asked to "pick the red mug".

Generates a held-out tabletop scene with a red mug, starts `flmm_grounding` (subprocess, real DDS on
an isolated domain), sends the scene and the instruction with the `flmm-ask` client, prints the spoken
answer and the objects, writes the overlay image, and checks the mask against the scene's ground truth.

    python -m flmm_ros.demo [--instruction "pick the red mug"] [--out out/demo]
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import cv2

from .tabletop.scenes import generate_scene, split_seeds

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PARAMS_FILE = PACKAGE_DIR / "config" / "grounding.yaml"


def demo_scene(kind: str = "mug", colour: str = "red", size=(480, 640)):
    """The first held-out (test split) scene with exactly one object of that colour and kind."""
    for seed in split_seeds("test", 1000):
        scene = generate_scene(seed, size=size)
        matches = [o for o in scene.objects if (o.kind, o.colour) == (kind, colour)]
        if len(matches) == 1 and len(scene.objects) >= 3:
            return scene, matches[0]
    raise RuntimeError(f"no test scene with a {colour} {kind}")


def wait_for_ready(node: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"the node exited with code {node.returncode}; log: {log_path}\n{log_path.read_text()}")
        if "model loaded" in log_path.read_text():
            return
        time.sleep(0.2)
    raise RuntimeError(f"the node did not become ready in {timeout:.0f} s; log: {log_path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instruction", default="pick the red mug")
    parser.add_argument("--out", default="out/demo", help="directory for the scene, overlay and node log")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scene, mug = demo_scene()
    scene_path, overlay_path, log_path = out / "scene.png", out / "overlay.png", out / "node.log"
    cv2.imwrite(str(scene_path), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
    print(f"scene: {scene_path} (test seed {scene.seed}: {', '.join(f'{o.colour} {o.kind}' for o in scene.objects)})")

    env = {**os.environ, "ROS_DOMAIN_ID": str(random.Random(os.getpid()).randint(100, 200)),
           "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    with open(log_path, "w") as log:
        node = subprocess.Popen([sys.executable, "-m", "flmm_ros.ros.node", "--ros-args", "--params-file",
                                 str(PARAMS_FILE), "-p", "input_qos:=RELIABLE"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_for_ready(node, log_path, args.timeout)
        print(f'asking: "{args.instruction}"')
        code = subprocess.call([sys.executable, "-m", "flmm_ros.ros.client", args.instruction, "--image",
                                str(scene_path), "--save-overlay", str(overlay_path), "--timeout",
                                str(args.timeout)], env=env)
    finally:
        node.terminate()
        node.wait(timeout=10)
    if code != 0:
        print(f"the client failed (exit {code}); node log: {log_path}")
        return code
    x0, y0, x1, y1 = mug.box
    print(f"ground truth: the {mug.colour} {mug.kind} is at box x={x0} y={y0} w={x1 - x0} h={y1 - y0}")
    print(f"overlay: {overlay_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
