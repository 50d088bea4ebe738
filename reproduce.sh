#!/usr/bin/env bash
# The whole pipeline for one preset, then the benchmark that the README's results tables come from.
#   bash reproduce.sh tiny        # CPU, about 1.5 h on 2 cores
#   bash reproduce.sh small       # one GPU
# Steps: teacher + distillation (python distill.py), then for training seeds 0-2 the long-tuning
# baseline, Delta Forcing, its two ablations and the step-floor variant from the same student, then
# sample.py --eval on fresh evaluation seeds (100-107), and the keep / recache / clear cache table.
# Writes $OUT_DIR/results.md (every results table of the README, with the date, device and commands),
# $OUT_DIR/results.json and $OUT_DIR/cache_*.json. Set OUT_DIR to keep runs apart (default out).
set -euo pipefail
cd "$(dirname "$0")"
P=${1:-tiny}
O=${OUT_DIR:-out}
case "$P" in tiny|small) ;; *) echo "reproduce.sh: error: preset must be tiny or small, not '$P'" >&2; exit 2;; esac
mkdir -p "$O"
MD="$O/results.md"
dev=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU, %d threads' % torch.get_num_threads())")
printf "# Results, preset %s\n\n%s, %s, torch %s. Made by \`bash reproduce.sh %s\`.\n" "$P" "$(date -u +%Y-%m-%d)" \
  "$dev" "$(python -c 'import torch; print(torch.__version__)')" "$P" > "$MD"
python distill.py --preset="$P" --out_dir="$O"
python - "$O" >> "$MD" <<'PY'
import sys, torch
o = sys.argv[1]
print("\n## Teacher and student (one-event clips of the teacher's length)\n")
print("| model | follow | valid | jumps | drift | canon | train minutes |\n|---|---:|---:|---:|---:|---:|---:|")
for name in ("teacher", "student"):
    m = torch.load(f"{o}/{name}.pt", map_location="cpu", weights_only=True)["metrics"]
    print(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in ("follow", "valid", "jumps", "drift", "canon"))
          + f" | {m.get('train_minutes', float('nan')):.1f} |")
PY
for s in 0 1 2; do
  python longtune.py --preset="$P" --out_dir="$O" --seed=$s --out_name=longtune_s$s.pt
  python longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --out_name=deltaforcing_s$s.pt
  python longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --tr_continuity=False --out_name=df_weights_s$s.pt
  python longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --tr_weights=False --out_name=df_continuity_s$s.pt
  python longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --step_floor=4 --out_name=df_floor4_s$s.pt
done
cp "$O/longtune_s0.pt" "$O/longtune.pt"
cp "$O/deltaforcing_s0.pt" "$O/deltaforcing.pt"
ck() { for s in 0 1 2; do printf "%s/%s_s%d.pt," "$O" "$1" $s; done; }
printf "\n## Long tuning and Delta Forcing\n" >> "$MD"
python sample.py --preset="$P" --eval --seeds=8 --first_seed=100 --json="$O/results.json" --md="$MD" \
  --ckpts="$O/student.pt,$(ck longtune)$(ck deltaforcing)$(ck df_weights)$(ck df_continuity)$(ck df_floor4)"
for m in keep recache clear; do
  printf "\n## Cache at the switch: %s\n" "$m" >> "$MD"
  python sample.py --preset="$P" --eval --seeds=8 --first_seed=100 --switch_cache=$m --ckpts="$(ck longtune)" \
    --json="$O/cache_$m.json" --md="$MD"
done
echo "wrote $MD"
