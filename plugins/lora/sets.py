"""Keys and a small cache for prepared LoRA sets (Nunchaku's composed LoRAs, for instance).

A set is identified by what it would compute: each file's resolved path and
stamp (mtime, size) with its weight, in order. A LoRA replaced under the same
name therefore misses the cache instead of serving the old file's weights.
"""

from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from plugins.lora.merge import file_stamp

# ((path, mtime_ns, size, weight), ...)
SetKey = tuple[tuple[str, int, int, float], ...]


def set_key(entries: Iterable[tuple[Path, float]]) -> SetKey:
    return tuple((str(Path(path).resolve()), *file_stamp(Path(path)), float(weight)) for path, weight in entries)


class SetCache:
    """Least-recently-used map from SetKey to a prepared set; holds at most `size` sets."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[SetKey, object] = OrderedDict()

    def get(self, key: SetKey, build: Callable[[], object]) -> object:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def forget(self, path: Path) -> None:
        """Drop every set that uses this file (it was deleted or replaced)."""
        name = str(Path(path).resolve())
        for key in [k for k in self._items if any(entry[0] == name for entry in k)]:
            del self._items[key]

    def __contains__(self, key: SetKey) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
