"""Guard torchvision's fake-op registrations in SGLang's CPU venv (run by setup_sglang.sh).

PyPI's torchvision 0.28 cannot load its C ops beside the CPU build of torch 2.13, and its
`_meta_registrations.py` then fails at import on `@torch.library.register_fake(
"torchvision::nms")` ("operator torchvision::nms does not exist"). SGLang imports
torchvision at load (for multimodal models; text models never use it). The guard makes
those two registrations do nothing when the C ops are absent, exactly as the file's own
`register_meta` already does for the others. Idempotent; the marker line lets the
pytest-rkv driver see the guard and declare it in the row.

Usage: <sglang venv>/bin/python scripts/sglang_torchvision_guard.py
"""

import importlib.util
import sys
from pathlib import Path

MARK = "# pytest-rkv guard"
ANCHOR = "import torchvision.extension  # noqa: F401\n"
GUARD = f"""
{MARK}: skip fake-op registration when torchvision's C ops did not load
def _rkv_register_fake(name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
"""


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed here; nothing to guard")
        return 0
    path = Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        print(f"{path}: already guarded")
        return 0
    if ANCHOR not in text or "@torch.library.register_fake(" not in text:
        print(f"{path}: unexpected layout (torchvision version?); cannot apply the guard", file=sys.stderr)
        return 1
    text = text.replace(ANCHOR, ANCHOR + GUARD, 1).replace("@torch.library.register_fake(", "@_rkv_register_fake(")
    path.write_text(text)
    print(f"{path}: guarded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
