#!/bin/sh
# `make gpu-check` on a lent GPU machine: no registry, no internet, its own python3 (3.12) and CUDA torch.
# Installs the wheels of build/gpu_bundle/ (made by `make gpu-bundle` where a registry is) into a scratch
# target, points the check at the bundle's ComfyUI and runs bench/gpu_check.py with the arguments given
# (pass `--out DIR`: only DIR comes back from that machine). Never installs torch.
#   GPU_BUNDLE_DIR  the bundle (default: build/gpu_bundle)   FT_SITE  the scratch target (default: /tmp/ft_site;
#                   ComfyUI is copied to ${FT_SITE}_comfyui and its packed tokenizers unpacked there)
#   PYTHON          the interpreter (default: python3)
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=${GPU_BUNDLE_DIR:-$REPO/build/gpu_bundle}
SITE=${FT_SITE:-/tmp/ft_site}
PY=${PYTHON:-python3}
if [ ! -f "$BUNDLE/manifest.json" ]; then
    echo "gpu-check: no bundle at $BUNDLE: run \`make gpu-bundle\` where a package registry is, and carry build/gpu_bundle" >&2
    exit 2
fi
"$PY" -c 'import torch' 2>/dev/null || { echo "gpu-check: $PY has no torch: the bundle never installs it" >&2; exit 2; }
# install once per bundle: the stamp is a copy of the manifest
if ! cmp -s "$BUNDLE/manifest.json" "$SITE/.frozentune-bundle.json" 2>/dev/null; then
    rm -rf "$SITE"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
        --find-links "$BUNDLE/wheels" --target "$SITE" -r "$BUNDLE/requirements-offline.txt"
    cp "$BUNDLE/manifest.json" "$SITE/.frozentune-bundle.json"
fi
# ComfyUI runs from a scratch copy: the tokenizers the DiT runs build travel packed (gzip) to fit the carry limit
# and are unpacked there, so the bundle itself never grows (it must still fit the next carry)
COMFY="${SITE}_comfyui"
rm -rf "$COMFY"
cp -R "$BUNDLE/comfyui" "$COMFY"
"$PY" "$REPO/tests/harness/gpu_bundle.py" --unpack "$COMFY"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export COMFYUI_DIR="$COMFY"
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$REPO/tests"
exec "$PY" ../bench/gpu_check.py "$@"
