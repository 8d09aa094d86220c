#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one go, on a machine with a CUDA card: numerics (CUDA vs CPU per
# mode) and extraction throughput (the Prefect flow against the bare loop and the card's raw rate,
# per decoder). Python packages the machine lacks may be given as wheels
# in .whl/ (installed into /tmp/site; `bash benchmarks/gpu_wheels.sh` fetches them). Results go to
# ${OUT:-benchmarks/results}. One run of the defaults took about 6.5 minutes on an H200 before the Dask step
# (about 1 more minute, not yet measured). A rerun can take only what failed: SKIP_AGREEMENT=1,
# RUNS=..., SKIP_DASK=1. A dry run on a machine without a card checks the script itself before device
# time is spent on it (2.5 minutes on 2 cores):
#   DEVICE=cpu MODEL=fast_proxy:lite0_shapes IMAGES=128 LOADER_WORKERS=2 DASK_IMAGES=64 DASK_LOADER_WORKERS=1 \
#   OUT=/tmp/dry bash benchmarks/gpu_checks.sh
set -u
out=${OUT:-benchmarks/results}
device=${DEVICE:-cuda}
case $device in cpu | cuda) ;; *) echo "DEVICE must be cpu or cuda, not $device" >&2; exit 2 ;; esac
model=${MODEL:-efficientnet_lite0}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
[ "$device" = cpu ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import os, torch, zarr; print('torch', torch.__version__, 'zarr', zarr.__version__, 'cores', os.cpu_count())"
engine=prefect
python3 -c "import prefect; print('prefect', prefect.__version__)" || engine=direct
images=${IMAGES:-8192}
workers=${LOADER_WORKERS:-12}
if [ -z "${SKIP_AGREEMENT:-}" ]; then
  timeout "${AGREEMENT_TIMEOUT:-150}" python3 benchmarks/gpu_agreement.py --out "$out/gpu_agreement_${device}.json"
fi
# RUNS: DECODER:LOADER[:LAYER,LAYER,...] triples (extract.decoder, execution.loader, the layers; the
# script's default layers when left out); add pil:threads to compare the decode threads, which share
# the interpreter lock with the model's thread, against processes.
for run in ${RUNS:-torchvision:threads pil:processes torchvision:threads:_blocks.3,_blocks.8,_blocks.12}; do
  IFS=: read -r decoder loader layers <<<"$run"
  layer_args=() name=${decoder}_$loader
  if [ -n "$layers" ]; then
    layer_args=(--layers ${layers//,/ }) name=${name}_$(echo "$layers" | tr -cd '0-9,' | tr , -)
  fi
  timeout "${THROUGHPUT_TIMEOUT:-240}" python3 benchmarks/extract_throughput.py --engine $engine --device "$device" \
    --model "$model" --images "$images" --batch-size 64 --shard-size 128 --loader-workers "$workers" --decoder "$decoder" \
    --loader "$loader" "${layer_args[@]}" --variants ${VARIANTS:-} --out "$out/extract_throughput_${device}_${engine}_$name.json"
done
# One worker per GPU on an external Dask cluster against the one-process flow; with one card, two
# workers share it (the contention of one card). SKIP_DASK=1 leaves it out.
if [ -z "${SKIP_DASK:-}" ] && [ "$engine" = prefect ]; then
  gpu_args=() name=workers
  if [ "$device" != cpu ]; then
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)  # cards, not MIG slices
    [ "$gpus" -ge 2 ] && pair=0,1 || pair=0,0
    gpu_args=(--gpus "${DASK_GPUS:-$pair}") name=$(echo "${DASK_GPUS:-$pair}" | tr , -)
  fi
  timeout "${DASK_TIMEOUT:-150}" python3 benchmarks/dask_workers.py --device "$device" "${gpu_args[@]}" \
    --model "$model" --images "${DASK_IMAGES:-2048}" --loader-workers "${DASK_LOADER_WORKERS:-6}" \
    --decoder torchvision --repeats 2 --out "$out/dask_workers_${device}_$name.json"
fi
