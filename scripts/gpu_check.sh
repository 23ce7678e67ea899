#!/usr/bin/env bash
# The project's GPU checks in one command, for a machine with a CUDA GPU:
#   1. the CUDA test tier (pytest -m cuda: fp16 + GradScaler, bf16, channels_last, compile,
#      EMA, NCCL under torchrun, pinned loader, CPU/GPU parity, export);
#   2. our ConvNeXt-T against timm's, timed alternately in one process (benchmark.py --vs),
#      train and eval at 224 px, batch 128, channels_last: bf16 with torch.compile, fp16 eager;
#   3. the 3M shape's speed-up over ConvNeXt-T (eval, bf16, channels_last).
# Writes one markdown table to $1 (default gpu_check.md). Each step has a time limit, so the
# whole run stays under 8 minutes on one H100; a step that fails or runs out says so in its
# row. Python: $PYTHON, else .venv/bin/python, else python3.
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_check.md}
py=${PYTHON:-}
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=.venv/bin/python; } || py=python3
if ! card=$("$py" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null); then
    echo "error: no CUDA GPU visible to torch ($py): nothing to check" >&2
    exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

"$py" -c "import torch, timm; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}')" > "$work/versions"
echo "[gpu_check] $card; $(cat "$work/versions")"

echo "[gpu_check] 1/3 CUDA test tier"
timeout 210 "$py" -m pytest -q -m cuda tests/test_cuda.py > "$work/tier.log" 2>&1
tier_status=$?
tier=$(tail -1 "$work/tier.log")
[ $tier_status -eq 124 ] && tier="timed out after 210 s ($tier)"

bench() {  # name seconds benchmark-flags...: one --vs run, its summary in $work/name.json
    local name=$1 limit=$2
    shift 2
    echo "[gpu_check] $name"
    timeout "$limit" "$py" scripts/benchmark.py --device cuda --input_size 224 --batch_size 128 \
        --channels_last --rounds 5 --warmup 5 --iters 10 --json "$work/$name.json" "$@" > "$work/$name.log" 2>&1
    echo $? > "$work/$name.status"
}
echo "[gpu_check] 2/3 ConvNeXt-T: timm's (A) against ours (B)"
bench train_bf16_compile 75 --vs timm_convnext:convnext_tiny convnext_tiny --vs_mode train --amp bf16 --compile
bench eval_bf16_compile 60 --vs timm_convnext:convnext_tiny convnext_tiny --vs_mode eval --amp bf16 --compile
bench train_fp16 45 --vs timm_convnext:convnext_tiny convnext_tiny --vs_mode train --amp fp16
bench eval_fp16 35 --vs timm_convnext:convnext_tiny convnext_tiny --vs_mode eval --amp fp16
echo "[gpu_check] 3/3 the 3M shape (B) against ConvNeXt-T (A)"
bench eval_3M_bf16 35 --vs convnext_tiny convnext_tiny_3M_pruned_cifar10 --vs_mode eval --amp bf16

"$py" - "$work" "$card" "$tier" "$(( $(date +%s) - start ))" > "$out" <<'PYEOF'
import json, os, sys
work, card, tier, seconds = sys.argv[1:]
rows = [("train_bf16_compile", "ConvNeXt-T train, bf16, compile: ours / timm"),
        ("eval_bf16_compile", "ConvNeXt-T eval, bf16, compile: ours / timm"),
        ("train_fp16", "ConvNeXt-T train, fp16 + GradScaler, eager: ours / timm"),
        ("eval_fp16", "ConvNeXt-T eval, fp16, eager: ours / timm"),
        ("eval_3M_bf16", "3M shape / ConvNeXt-T, eval, bf16, eager")]
print(f"GPU checks on {card} ({open(os.path.join(work, 'versions')).read().strip()}), {seconds} s in all.\n")
print(f"CUDA test tier (pytest -m cuda): {tier}\n")
print("| check (224 px, batch 128, channels_last) | A img/s | B img/s | B/A median (min-max, 5 rounds) | MACs A/B |")
print("|---|---:|---:|---:|---:|")
for name, label in rows:
    status = open(os.path.join(work, f"{name}.status")).read().strip()
    path = os.path.join(work, f"{name}.json")
    if status != "0" or not os.path.exists(path):
        log = open(os.path.join(work, f"{name}.log")).read().strip().splitlines()
        why = "timed out" if status == "124" else f"failed: {log[-1][:120] if log else 'no output'}"
        print(f"| {label} | - | - | {why} | - |")
        continue
    s = json.loads(open(path).read().splitlines()[0])
    med = lambda v: sorted(v)[len(v) // 2]
    print(f"| {label} | {med(s['a_img_s']):.0f} | {med(s['b_img_s']):.0f} | {s['ratio_median']:.3f} "
          f"({s['ratio_min']:.3f}-{s['ratio_max']:.3f}) | {s['a_macs'] / s['b_macs']:.2f} |")
PYEOF
echo "[gpu_check] done in $(( $(date +%s) - start )) s: $out"
cat "$out"
