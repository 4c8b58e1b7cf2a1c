"""What SGLang reports and how its versions compare; the families themselves are in server/families.py.

SGLang's reported task types (`supported_task_types`) can only narrow what a family's row allows.
"""

import re

# SGLang task types that mean an endpoint is there.
IMAGE_TASKS = {"T2I", "TI2I"}
EDIT_TASKS = {"I2I", "TI2I"}
VIDEO_TASKS = {"T2V", "I2V", "TI2V"}


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.5.23' -> (0, 5, 23); a suffix such as 'rc1' or '.post1' is ignored."""
    parts = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d+", part)
        parts.append(int(digits[0]) if digits else 0)
    return tuple(parts)
