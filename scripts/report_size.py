"""What a report's bytes are made of: per embedded image format, the count, total bytes and the
largest pixel size, then the rest of the page (tables, text, style).

    .venv/bin/python scripts/report_size.py demo-out/run/report/index.html
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import sys
from collections import defaultdict
from pathlib import Path

from PIL import Image

SOURCE = re.compile(r'src="data:image/([a-z]+);base64,([^"]*)"')


def main(path: str) -> None:
    page = Path(path).read_text(encoding="utf-8")
    kinds: dict[str, list] = defaultdict(list)
    for kind, data in SOURCE.findall(page):
        try:
            with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
                size = image.size
        except (binascii.Error, OSError):
            size = (0, 0)
        kinds[kind].append((len(data), size))
    embedded = sum(n for found in kinds.values() for n, _ in found)
    print(f"{'report':<10} {len(page.encode()):>12,} bytes")
    for kind, found in sorted(kinds.items()):
        widest = max(found, key=lambda f: f[1][0])[1]
        print(
            f"{kind:<10} {sum(n for n, _ in found):>12,} bytes in {len(found)} images "
            f"(base64; widest {widest[0]}×{widest[1]} px)"
        )
    print(f"{'rest':<10} {len(page.encode()) - embedded:>12,} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-out/run/report/index.html")
