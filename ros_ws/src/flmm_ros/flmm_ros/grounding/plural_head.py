"""A grounding head for plural phrases (issue #18), kept beside a bundle's head.

F-LMM's head is trained on referring expressions that name one object. Going on training it with plural phrases
("all the mugs", target: the union of their masks) taught it those, but cost single-object masks a little (the
embedded model: refined cIoU 0.788 -> 0.779 on 500 test scenes), so the plural-trained head is a second head,
used for plural phrases only: `plural_head: head_plural.safetensors` in flmm_bundle.yaml. It shares the LMM and
the frozen SAM image encoder (so the file leaves the encoder out; weights in float16) and the frame's SAM embedding;
its mask head, text projection and SAM prompt encoder / mask decoder are its own. Without one, plural phrases use
the main head.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .bundle import BUNDLE_FILE, is_bundle, read_bundle_spec
from .checkpoint import load_head, save_head
from .head import GroundingHead
from .types import GroundingError

PLURAL_HEAD_KEY = "plural_head"
PLURAL_HEAD_FILE = "head_plural.safetensors"


def plural_head_path(model: str) -> Path | None:
    """The bundle's plural head file, or None (a plain LMM, or a bundle without one)."""
    if not is_bundle(model):
        return None
    name = read_bundle_spec(model).get(PLURAL_HEAD_KEY)
    if not name:
        return None
    path = Path(model) / name
    if not path.is_file():
        raise GroundingError(f"{Path(model) / BUNDLE_FILE} names a plural head {name!r} that is not there")
    return path


def load_plural_head(head: GroundingHead, path: str | Path) -> GroundingHead:
    """A copy of `head` (same sizes, same SAM image encoder) with the plural head's weights."""
    plural = copy.deepcopy(head)
    load_head(plural, path)
    return plural.eval()


def write_plural_head(bundle: str | Path, head: GroundingHead) -> Path:
    """Store `head` as the bundle's plural head (without the SAM image encoder) and name it in the bundle file."""
    bundle = Path(bundle)
    spec = read_bundle_spec(bundle)
    # float16 on disk (half the size; loaded back into the head's float32), no image encoder (the main head's).
    save_head(copy.deepcopy(head).half(), bundle / PLURAL_HEAD_FILE, include_image_encoder=False)
    spec[PLURAL_HEAD_KEY] = PLURAL_HEAD_FILE
    (bundle / BUNDLE_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return bundle / PLURAL_HEAD_FILE
