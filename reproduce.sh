#!/usr/bin/env bash
# The whole pipeline for one preset, and the results tables made from it.
#   bash reproduce.sh tiny            # CPU: about 6-7 h on 2 cores (3 seeds, ablations, rho = 0 chain included)
#   bash reproduce.sh small           # one GPU
#   STAGES=main bash reproduce.sh tiny   # only teacher, distill, probes, baseline and Delta Forcing (seed 0): ~1 h
# Steps: teacher + distillation (python distill.py) and the two probes; for training seeds 0-2
# the long-tuning baseline, Delta Forcing and its three ablations (weights only, continuity only,
# no appearance term) from the same student; the tau sweep (seed 0); LongLive's one-event windows
# (seed 0); how identity fails; a strip; the rho = 0 control chain (teacher, student, baseline,
# Delta Forcing); the benchmark on fresh evaluation seeds 100-115 (tau is tuned on seeds 0-7); the
# cache-at-switch table.
# Writes $OUT_DIR/results.md (every table, with date, device and commands) and JSON beside it.
set -euo pipefail
cd "$(dirname "$0")"
P=${1:-tiny}
O=${OUT_DIR:-out}
STAGES=${STAGES:-all}
case "$P" in tiny|small) ;; *) echo "reproduce.sh: error: preset must be tiny or small, not '$P'" >&2; exit 2;; esac
case "$STAGES" in all|main) ;; *) echo "reproduce.sh: error: STAGES must be all or main, not '$STAGES'" >&2; exit 2;; esac
mkdir -p "$O"
MD="$O/results.md"
dev=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU, %d threads' % torch.get_num_threads())")
printf "# Results, preset %s\n\n%s, %s, torch %s. Made by \`STAGES=%s bash reproduce.sh %s\`.\n" "$P" "$(date -u +%Y-%m-%d)" \
  "$dev" "$(python -c 'import torch; print(torch.__version__)')" "$STAGES" "$P" > "$MD"
t() { local t0=$SECONDS; "$@"; echo "  ($(( SECONDS - t0 )) s: $*)" | tee -a "$O/times.log"; }

t python distill.py --preset="$P" --out_dir="$O"
python - "$O" >> "$MD" <<'PY'
import sys, torch
o = sys.argv[1]
print("\n## Teacher and student (the teacher's evaluation clips: one-event and switch clips of its length)\n")
keys = ("follow", "valid", "jumps", "react", "latency", "identity", "bias", "train_minutes")
print("| model | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
for name, pre in (("teacher", ""), ("student (EMA)", ""), ("student (raw)", "raw_")):
    m = torch.load(f"{o}/{name.split()[0]}.pt", map_location="cpu", weights_only=True)["metrics"]
    print(f"| {name} | " + " | ".join(f"{m.get(pre + k, m.get(k, float('nan'))):.3f}" for k in keys) + " |")
PY
printf "\n## Probes\n\n\`\`\`\n" >> "$MD"
python probes.py --preset="$P" --teacher="$O/teacher.pt" --student="$O/student.pt" | tee -a "$MD"
printf "\`\`\`\n" >> "$MD"

SEEDS="0 1 2"; [ "$STAGES" = main ] && SEEDS="0"
for s in $SEEDS; do
  t python longtune.py --preset="$P" --out_dir="$O" --seed=$s --out_name=longtune_s$s.pt
  t python longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --out_name=deltaforcing_s$s.pt
  if [ "$STAGES" = all ]; then
    t python longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --tr_continuity=False --out_name=df_weights_s$s.pt
    t python longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --tr_weights=False --out_name=df_continuity_s$s.pt
    t python longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --tr_appearance=False --out_name=df_second_s$s.pt
  fi
done
cp "$O/longtune_s0.pt" "$O/longtune.pt"
cp "$O/deltaforcing_s0.pt" "$O/deltaforcing.pt"
ck() { for s in $SEEDS; do printf "%s/%s_s%d.pt," "$O" "$1" $s; done; }
EVAL="python sample.py --preset=$P --eval --seeds=16 --first_seed=100"
printf "\n## Long tuning and Delta Forcing (evaluation seeds 100-115)\n" >> "$MD"
ROWS="$O/student.pt,$(ck longtune)$(ck deltaforcing)"
[ "$STAGES" = all ] && ROWS="$ROWS$(ck df_weights)$(ck df_continuity)$(ck df_second)"
t $EVAL --json="$O/results.json" --md="$MD" --ckpts="$ROWS"
[ "$STAGES" = main ] && { echo "wrote $MD"; exit 0; }

printf "\n## The tau frontier (seed 0; tuned on evaluation seeds 0-7, reported on 100-115)\n" >> "$MD"
TAUS=""
for tau in 0.125 0.25 1; do
  t python longtune.py --preset="$P" --out_dir="$O" --trust_region=True --tau=$tau --out_name=df_tau$tau.pt
  TAUS="$TAUS$O/df_tau$tau.pt,"
done
python sample.py --preset="$P" --eval --seeds=8 --first_seed=0 --pool=False --json="$O/tau_tuning.json" \
  --ckpts="$O/longtune_s0.pt,$O/deltaforcing_s0.pt,$TAUS"
t $EVAL --pool=False --json="$O/tau.json" --md="$MD" --ckpts="$O/longtune_s0.pt,$O/deltaforcing_s0.pt,$TAUS"

printf "\n## LongLive's one-event windows (--window_events=current, seed 0)\n" >> "$MD"
t python longtune.py --preset="$P" --out_dir="$O" --window_events=current --out_name=longtune_current.pt
t python longtune.py --preset="$P" --out_dir="$O" --window_events=current --trust_region=True --out_name=deltaforcing_current.pt
t $EVAL --pool=False --json="$O/current.json" --md="$MD" --ckpts="$O/longtune_current.pt,$O/deltaforcing_current.pt"

printf "\n## How identity fails after a switch (seed 0)\n\n\`\`\`\n" >> "$MD"
python probes.py --preset="$P" --failures="$O/longtune_s0.pt,$O/deltaforcing_s0.pt" --first_seed=100 --seeds=16 | tee -a "$MD"
printf "\`\`\`\n" >> "$MD"
python - "$O" <<'PY'
import sys, torch
import sample
from world import save_strip
o, text, seed, j = sys.argv[1], "right@0,down@12,left@24,up@36", 114, 4   # the README's strip: schedule 4, seed 114
rows = []
for name in ("longtune_s0", "deltaforcing_s0"):
    g = sample.load_generator(f"{o}/{name}.pt", torch.device("cpu"))
    n = 6 * g.stream["window"]
    x, _ = sample.generate(g, sample.schedule_tensor(text, n, g.chunk, 1, "cpu"), [1000 * j + seed], "recache")
    rows.append(x[0, 18::2][:16])
save_strip(f"{o}/strip_multi_{seed}.png", torch.stack(rows))
print(f"wrote {o}/strip_multi_{seed}.png")
PY

printf "\n## The rho = 0 control (no colour prior per event)\n" >> "$MD"
R="$O/rho0"
mkdir -p "$R"
t python teacher.py --preset="$P" --out_dir="$R" --rho=0
t python distill.py --preset="$P" --out_dir="$R"
t python longtune.py --preset="$P" --out_dir="$R"
t python longtune.py --preset="$P" --out_dir="$R" --trust_region=True
t $EVAL --pool=False --json="$O/rho0.json" --md="$MD" --ckpts="$R/student.pt,$R/longtune.pt,$R/deltaforcing.pt"

for m in keep recache clear; do
  printf "\n## Cache at the switch: %s\n" "$m" >> "$MD"
  t $EVAL --switch_cache=$m --ckpts="$(ck longtune)" --json="$O/cache_$m.json" --md="$MD"
done
echo "wrote $MD"
