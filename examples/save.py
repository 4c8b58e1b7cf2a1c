"""Save the images of an Images API answer read on stdin, and say where; an error answer is printed, exit 1.

    curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' \\
      -d '{"prompt": "a lighthouse at dawn", "size": "512x512"}' | python3 examples/save.py lighthouse.jpeg

Usage: python3 examples/save.py [OUT_FILE]. One image goes to OUT_FILE (default image.<output_format>), several
to OUT_FILE with -0, -1... before its suffix. One line per image: the file, then what else the server said about
it (seed; nsfw, upload... from plugins). Standard library only: any python3 runs it.
"""

import base64
import json
import sys
from pathlib import Path


def error_line(text: str) -> str | None:
    """What to print instead of saving: an error answer's message, or why the text is no answer; None if it is."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return f"not an Images API answer (is the server running there?): {text[:200]!r}"
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        error = dict(answer["error"])
        return f"error: {error.pop('message', '')} {json.dumps(error)}"
    return None if isinstance(answer, dict) and "data" in answer else f"not an Images API answer: {text[:200]!r}"


def save(answer: dict, out: Path) -> list[str]:
    """Writes each b64_json image; one line per image."""
    items = answer["data"]
    lines = []
    for i, item in enumerate(items):
        details = json.dumps({k: v for k, v in item.items() if k != "b64_json"})
        if "b64_json" not in item:  # a URL, or uploaded by the upload plugin
            lines.append(f"image {i}: {details}")
            continue
        path = out if len(items) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        path.write_bytes(base64.b64decode(item["b64_json"]))
        lines.append(f"wrote {path} ({answer.get('size', '?')}): {details}")
    return lines


def main() -> int:
    text = sys.stdin.read()
    problem = error_line(text)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    answer = json.loads(text)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else f"image.{answer.get('output_format', 'png')}")
    print("\n".join(save(answer, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
