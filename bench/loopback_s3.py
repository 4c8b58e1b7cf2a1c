"""A local S3 stand-in for trying the upload plugin: moto's S3 server on loopback with one bucket, pre-signed PUT
URLs to paste into a request's `upload_urls`, and the settings that let the server upload there. Then it prints
each object as it arrives, until Ctrl-C.

    scripts/try-upload.sh          (installs moto into .venv if needed, then runs this)
    .venv/bin/python bench/loopback_s3.py --urls 2 --port 8001
"""

import argparse
import json
import shlex
import sys
import time

import harness

# Loopback and plain http: the upload plugin refuses both unless the host is trusted.
SERVER_SETTINGS = "PLUGINS=upload UPLOAD_ALLOWED_HOSTS=127.0.0.1"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", type=int, default=1, choices=range(1, 11), metavar="1..10", help="pre-signed URLs")
    p.add_argument("--port", type=int, default=8001, help="the image-server's port, in the commands shown")
    p.add_argument("--expires", type=int, default=3600, help="seconds the URLs stay valid")
    return p.parse_args(argv)


def instructions(s3: harness.LoopbackS3, urls: list[str], port: int, expires: int) -> str:
    body = {"prompt": "a red fox in the snow", "size": "256x256", "n": len(urls), "upload_urls": urls}
    return "\n".join(
        [
            f"A local S3 (moto) listens on {s3.url}, bucket {s3.bucket!r}; Ctrl-C stops it.",
            "Serve with the upload plugin, trusting it (it is on loopback, in plain http):",
            f"  {SERVER_SETTINGS} .venv/bin/image-server serve --port {port}",
            "Then ask for images uploaded there (from the repository's folder):",
            f"  curl -s localhost:{port}/v1/images/generations -H 'Content-Type: application/json' \\",
            f"    -d {shlex.quote(json.dumps(body))} | python3 examples/save.py",
            f"Pre-signed PUT URLs (valid {expires} s):",
            *(f"  {url}" for url in urls),
            "Waiting for uploads...",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.exit_on_sigterm()
    with harness.LoopbackS3(bucket="images") as s3:
        urls = [s3.presign(f"try/{i}.jpeg", args.expires) for i in range(args.urls)]
        print(instructions(s3, urls, args.port, args.expires), flush=True)
        seen: dict[str, int] = {}
        try:
            while True:
                for key, size in s3.objects().items() - seen.items():
                    print(f"received s3://{s3.bucket}/{key}: {size} bytes", flush=True)
                    seen[key] = size
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
