"""Peak memory of extraction does not grow with the collection: N against 4N images.

Each size runs in a fresh process: the extraction task bodies (``plan_extraction``, then
``run_shards`` per block, ``record_shard_rejects``) on EfficientNet-Lite0, layers ``_blocks.8
_blocks.12``, generated 256-px JPEG scenes. The process's peak RSS (VmHWM) after the model is loaded
and warmed up is reset, so the number is what extraction itself adds.

    python benchmarks/extract_memory.py --images 64 --out benchmarks/results/extract_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, re, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
sys.path.insert(0, sys.argv[3] + "/benchmarks")
from scene_files import write_images
from flows.extract import shard_blocks
from sacv.config import parse_config
from sacv.extract.extraction import record_shard_rejects, run_shards
from sacv.extract.extraction_plan import plan_extraction
from sacv.method.models import cached_model

root, n = Path(sys.argv[1]), int(sys.argv[2])
write_images(root / "data" / "tabby", n, seed=0)
config = parse_config({"run_dir": str(root / "run"), "layers": ["_blocks.8", "_blocks.12"],
                       "dataset": {"root": str(root / "data"), "target": "predicted"},
                       "extract": {"shard_size": 32, "batch_size": 16}, "execution": {"device": "cpu"}})
cached_model(config.model.spec, None, "cpu")
def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
started = time.perf_counter()
plan = plan_extraction(config.run_dir, config)
for group, shards in shard_blocks(plan.todo, config.extract.shards_per_task):
    run_shards(config.run_dir, config, group, shards)
record_shard_rejects(config.run_dir)
print(json.dumps({"images": n, "seconds": round(time.perf_counter() - started, 2),
                  "rss_before_mb": round(before / 1024, 1),
                  "peak_growth_mb": round((status("VmHWM") - before) / 1024, 1)}))
"""


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="N; the second run has 4N")
    parser.add_argument("--out", default="benchmarks/results/extract_memory_cpu.json")
    args = parser.parse_args(argv)
    runs = []
    for n in (args.images, 4 * args.images):
        with tempfile.TemporaryDirectory(prefix="sacv-mem-") as tmp:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, tmp, str(n), str(REPO)], capture_output=True, text=True, check=True
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratio = runs[1]["peak_growth_mb"] / max(runs[0]["peak_growth_mb"], 1e-9)
    result = {"benchmark": "extract_memory", "runs": runs, "peak_growth_ratio_4x": round(ratio, 3)}
    print_table(
        [
            (
                f"{r['images']} images",
                f"peak growth {r['peak_growth_mb']} MB over {r['rss_before_mb']} MB, {r['seconds']} s",
            )
            for r in runs
        ]
        + [("ratio 4N / N", f"{ratio:.2f}")]
    )
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
