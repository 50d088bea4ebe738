#!/usr/bin/env bash
# The whole pipeline for one preset, then the benchmark that the README's results tables come from.
#   bash reproduce.sh tiny        # CPU
#   bash reproduce.sh small       # one GPU
# Steps: teacher + distillation (python distill.py), then for training seeds 0-2 the long-tuning
# baseline, Delta Forcing, its two ablations and the step-floor variant from the same student, then sample.py --eval on
# fresh evaluation seeds (100-107), and the keep / recache / clear cache table.
set -euo pipefail
cd "$(dirname "$0")"
P=${1:-tiny}
O=${OUT_DIR:-out}
python distill.py --preset="$P" --out_dir="$O"
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
python sample.py --preset="$P" --eval --seeds=8 --first_seed=100 --json="$O/results.json" \
  --ckpts="$O/student.pt,$(ck longtune)$(ck deltaforcing)$(ck df_weights)$(ck df_continuity)$(ck df_floor4)"
for m in keep recache clear; do
  echo "== cache at the switch: $m"
  python sample.py --preset="$P" --eval --seeds=8 --first_seed=100 --switch_cache=$m --ckpts="$(ck longtune)" \
    --json="$O/cache_$m.json"
done
