"""A local S3 stand-in for trying the upload plugin: moto's S3 server on loopback with one bucket, pre-signed PUT
URLs to paste into a request's `upload_urls`, and the settings that let the server upload there. Then it prints
each object as it arrives, until Ctrl-C.

    scripts/try-upload.sh          (installs moto into .venv if needed, then runs this)
    .venv/bin/python bench/loopback_s3.py --urls 2 --port 8001 --s3-port 9000
"""

import argparse
import json
import shlex
import sys
import time

import harness


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", type=int, default=1, choices=range(1, 11), metavar="1..10", help="pre-signed URLs")
    p.add_argument("--port", type=int, default=8001, help="the image-server's port, in the commands shown")
    p.add_argument("--s3-port", type=int, default=9000, help="the local S3's port (MinIO's usual one)")
    p.add_argument("--expires", type=int, default=3600, help="seconds the URLs stay valid")
    return p.parse_args(argv)


def instructions(s3: harness.LoopbackS3, urls: list[str], port: int, expires: int) -> str:
    body = {"prompt": "a red fox in the snow", "size": "256x256", "n": len(urls), "upload_urls": urls}
    return "\n".join(
        [
            f"A local S3 (moto) listens on {s3.url}, bucket {s3.bucket!r}; Ctrl-C stops it.",
            "Serve with the upload plugin, trusting it (loopback and plain http are refused unless trusted):",
            f"  PLUGINS=upload UPLOAD_ALLOWED_HOSTS=127.0.0.1:{s3.port} .venv/bin/image-server serve --port {port}",
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
    try:
        with harness.LoopbackS3(bucket="images", port=args.s3_port) as s3:
            return serve(s3, args)
    except RuntimeError as exc:  # the port is taken, or moto did not start
        raise SystemExit(f"loopback_s3: {exc}; choose another port with --s3-port") from None


def serve(s3: harness.LoopbackS3, args: argparse.Namespace) -> int:
    """Prints the URLs and how to use them, then each object as it arrives, until Ctrl-C."""
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
