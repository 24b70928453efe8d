#!/usr/bin/env bash
# The GPU check (docs/compatibility.md): the paths CPU tests never touch, on a CUDA machine.
# Runs the host, end-to-end and browser tests plus the benchmarks twice: with ComfyUI's default
# flags (dynamic VRAM on NVIDIA since ComfyUI 0.12) and with --disable-dynamic-vram (the
# estimate-based loading of older releases; skipped on hosts that lack the flag). Each tier's
# pytest summary and the benchmark tables land in out/gpu_check/<mode>/.
#
#   bash tools/gpu_check.sh                 # the pinned host
#   COMFYUI_PATH=/path/to/ComfyUI bash tools/gpu_check.sh
#   GPU_CHECK_TIERS="host e2e" bash tools/gpu_check.sh   # a subset (host e2e browser bench)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PLUGKIT_VENV:-.venv}/bin/python"
[ -x "$PY" ] || bash tools/setup.sh || exit 1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: torch sees no CUDA device; this check is for GPU machines" >&2; exit 2; }
HOST="$("$PY" -m tools.harness.host)" || exit 1
TIERS="${GPU_CHECK_TIERS:-host e2e browser bench}"
MODES=("default")
if grep -q -- "--disable-dynamic-vram" "$HOST/comfy/cli_args.py"; then
  MODES+=("--disable-dynamic-vram")
else
  echo "gpu_check: $HOST has no --disable-dynamic-vram (before ComfyUI 0.12); one mode only"
fi
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'on', torch.cuda.get_device_name())"
echo "gpu_check: host $HOST"
status=0
for mode in "${MODES[@]}"; do
  out="out/gpu_check/${mode#--}"
  mkdir -p "$out"
  if [ "$mode" = default ]; then export PLUGKIT_COMFY_ARGS=""; else export PLUGKIT_COMFY_ARGS="$mode"; fi
  for tier in $TIERS; do
    case "$tier" in
      host) "$PY" -m pytest -q -p no:cacheprovider tests/*/test_*_host.py tests/diff_plugin/test_diff_plugin_multigpu.py \
              2>&1 | tee "$out/host.txt" | tail -n 3 ;;
      e2e) "$PY" -m pytest -q -p no:cacheprovider tests/e2e 2>&1 | tee "$out/e2e.txt" | tail -n 3 ;;
      browser) "$PY" -m pytest -q -p no:cacheprovider tests/browser 2>&1 | tee "$out/browser.txt" | tail -n 3 ;;
      bench) "$PY" -m tools.bench 2>&1 | tee "$out/bench.txt" | tail -n 40 ;;
      *) echo "gpu_check: unknown tier $tier" >&2; exit 2 ;;
    esac
    rc=${PIPESTATUS[0]}
    echo "gpu_check: mode=$mode tier=$tier rc=$rc"
    [ "$rc" -eq 0 ] || status=1
  done
done
exit "$status"
