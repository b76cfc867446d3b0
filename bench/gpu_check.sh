#!/usr/bin/env bash
# The one-command GPU check, for whoever has a CUDA machine (e.g. the device tool's H100/H200).
#
# Prepare on a machine with the package registries (the GPU machine has no network):
#   pip download --no-deps -d .gpu-wheels exllamav2==0.3.2 <deps the GPU machine's `pip list` lacks>
# and carry .gpu-wheels along. On the GPU machine, from the repository root:
#   OUT=/some/dir bash bench/gpu_check.sh
# It installs the wheels and the project (no network, no deps resolution), compiles exllamav2's
# extension, runs every `gpu` test, then the GPU benchmarks; everything lands in $OUT.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PIXTRAL_GPU_OUT="$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

log "python $(python3 --version 2>&1), torch $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
  pip install --no-deps --no-index .gpu-wheels/*.whl > "$OUT/install.txt" 2>&1 && log "wheels installed" || log "wheel install FAILED (see install.txt)"
fi
pip install --no-deps --no-build-isolation --no-index -e . >> "$OUT/install.txt" 2>&1 && log "project installed" || log "project install FAILED"

started=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python3 -c "import exllamav2, exllamav2.ext; print('exllamav2', exllamav2.__version__)" \
  > "$OUT/exllamav2_build.txt" 2>&1 && log "exllamav2 built in $(( $(date +%s) - started )) s" || log "exllamav2 build FAILED (see exllamav2_build.txt)"

# which attention exllamav2 will run (flash-attn is optional: without it the backend runs unpaged, masked)
python3 -c "import exllamav2; from runtime.backends.exllamav2 import attention_path; print(attention_path(exllamav2.ExLlamaV2Config()))" \
  > "$OUT/attention.txt" 2>&1; log "attention path: $(tail -n 1 "$OUT/attention.txt")"

python3 -m pytest -m gpu -v -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.txt" 2>&1
log "gpu tests: $(tail -n 1 "$OUT/gpu_tests.txt")"

python3 bench/decode.py --gpu --json "$OUT/decode_gpu.json" > "$OUT/decode_gpu.txt" 2>&1 && log "decode bench: $(grep ratio "$OUT/decode_gpu.txt")" || log "decode bench FAILED (see decode_gpu.txt)"
python3 bench/quantize.py --gptq --device cuda > "$OUT/gptq_core_gpu.txt" 2>&1 && log "GPTQ core: $(grep -c faster "$OUT/gptq_core_gpu.txt") shapes timed" || log "GPTQ core bench FAILED"
python3 bench/serve_load.py --backend exllamav2 --compare-serial --seconds 30 --json "$OUT/serve_load_gpu.json" > "$OUT/serve_load_gpu.txt" 2>&1 \
  && log "serve load: $(grep batched_over_serial "$OUT/serve_load_gpu.txt")" || log "serve load bench FAILED (see serve_load_gpu.txt)"
for bench in bench/gpu_*.py; do
  [ -e "$bench" ] || continue
  name=$(basename "$bench" .py)
  python3 "$bench" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 && log "$name: done" || log "$name FAILED (see $name.txt)"
done
log "results in $OUT"
