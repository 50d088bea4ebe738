#!/usr/bin/env bash
# The whole pipeline for one preset, and the results tables made from it.
#   bash tools/reproduce.sh tiny            # CPU: about 9.5 h on 2 cores (3 seeds, controls, ablations, rho = 0 chain included)
#   bash tools/reproduce.sh small           # one GPU: teacher, distill, probes, baseline and Delta Forcing (seed 0), the
#                                     # evaluation; the small preset's steps are sized for about 6 min on one H100
#   STAGES=main bash tools/reproduce.sh tiny   # only teacher, distill, probes, baseline and Delta Forcing (seed 0): ~1 h
#   bash tools/reproduce.sh gpu-check DIR   # one GPU slot (580 s): the CUDA tests, `tools/reproduce.sh small`, a GIF, tools.bench,
#                                     # each under its own time limit, going on past a failure; 8 files in DIR
#   REHEARSE=1 bash tools/reproduce.sh gpu-check DIR   # the same on the CPU: 2 steps of batch 4 per loop, bench tiny
#   STAGES=final bash tools/reproduce.sh tiny   # the next reading's final table: seeds 300-331, training seeds 3-7,
#                                     # the controls at 3-5, the rho = 0 chain; run it once (about 11 h on 2 cores)
#   STAGES=final SEEDS="3 4 5" CONTROLS=3 RHO0= bash tools/reproduce.sh tiny   # a part of it (the seeds named); the parts'
#                                     # tables pooled: python -m tools.evaluate --merge=A/final.json,B/final.json --reference=...
# Steps: teacher, distillation and the two probes; for training seeds 0-2 the long-tuning baseline,
# Delta Forcing and the constant-w control (w held at the default runs' mean trust) from the same student;
# the ablations (seed 0: step only, continuity only, with 6', without the floor); the signal AUC table (tools.drift
# --probe=signals); training with the sink relabelled (seeds 0, 1); the tau frontier (seed 0) and its
# picture; LongLive's one-event windows
# (seed 0); how identity fails; a strip; the rho = 0 control chain (teacher, student, baseline,
# Delta Forcing with and without the floor); the benchmark on the validation seeds 100-115 (tau is tuned on seeds 0-7); the
# cache-at-switch table; where drift comes from (tools.drift: cache policy x segment length, the
# teacher's and critic's colour verdicts, the noise band).
# Writes $OUT_DIR/results.md (every table, with date, device and commands) and JSON beside it.
set -euo pipefail
cd "$(dirname "$0")/.."                                         # the repository root
PY=${PYTHON:-$(command -v python3 || command -v python)}     # the GPU machines have python3 only
P=${1:-tiny}
O=${OUT_DIR:-out}

if [ "$P" = gpu-check ]; then
  D=${2:?usage: bash tools/reproduce.sh gpu-check DIR}
  rm -rf "$O/gpu_check"                                        # never report an earlier run's models as this one's
  mkdir -p "$D" "$O"
  D=$(cd "$D" && pwd)
  STEPS="$O/gpu_check_steps.tsv"
  : > "$STEPS"
  # each step: a name, a time limit in seconds, a command; its output goes to log.txt, its exit code and time to STEPS
  step() {
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    echo "=== $name (limit $limit s): $*" >> "$D/log.txt"
    timeout -k 10 "$limit" "$@" >> "$D/log.txt" 2>&1 || rc=$?
    printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$(( SECONDS - t0 ))" "$*" >> "$STEPS"
  }
  : > "$D/log.txt"
  step env 20 "$PY" -c "import torch, einops, numpy, tqdm, imageio, pytest; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  # The pipeline before bench: it matters most, and its compiles (same shapes) fill the caches bench then reuses.
  # bench last: every row is saved as it is measured, so a cut keeps the rows so far.
  if [ -n "${REHEARSE:-}" ]; then                              # the CPU, tiny sizes: proves the script, not CUDA
    export CUDA_TESTS_ON_CPU=1 REHEARSE=1                       # (REHEARSE reaches tools/reproduce.sh small too)
    L=(300 900 300); BENCH=(--preset=tiny --late=100 --frames=32 --steps=1 --repeats=1)
  else                                                          # 580 s at most, for a 600 s slot
    L=(100 310 120); BENCH=(--preset=small --frames=96 --profile=True)
  fi
  step cuda-tests "${L[0]}" "$PY" -m pytest -q tests/test_cuda.py
  step pipeline "${L[1]}" env OUT_DIR="$O/gpu_check" bash tools/reproduce.sh small
  step sample 30 "$PY" sample.py --ckpt="$O/gpu_check/deltaforcing.pt" --out="$D/sample.gif" --frames=72 \
    --events="right@0,down@18,left@36,up@54" --seed=114 --compile=False
  step bench "${L[2]}" "$PY" -m tools.bench "${BENCH[@]}" --json="$D/bench.json"
  rm -f "$D"/*.tmp
  cp "$O/gpu_check/results.md" "$O/gpu_check/results.json" "$D/" 2>/dev/null || true
  "$PY" - "$D" "$STEPS" "$O/gpu_check" <<'PY'
import json, os, sys, datetime, torch
d, steps, run = sys.argv[1:]
rows = [dict(zip(("step", "exit", "seconds", "command"), l.rstrip("\n").split("\t"))) for l in open(steps)]
summary = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (rehearsal)", steps=rows)
def read(load, p):                                            # whatever a killed step left: read it if it reads
    try:
        return load(p) if os.path.exists(p) else None
    except Exception as e:
        return f"unreadable: {type(e).__name__}"
for name in ("bench", "results"):
    summary[name] = read(lambda p: json.load(open(p)), os.path.join(d, f"{name}.json"))
for name in ("teacher", "student", "longtune", "deltaforcing"):
    summary[name] = read(lambda p: torch.load(p, map_location="cpu", weights_only=True)["metrics"], os.path.join(run, f"{name}.pt"))
p = os.path.join(run, "times.log")
summary["stage_times"] = open(p).read().splitlines() if os.path.exists(p) else []
json.dump(summary, open(os.path.join(d, "summary.json"), "w"), indent=1)
with open(os.path.join(d, "summary.md"), "w") as f:
    f.write(f"# GPU check, {summary['device']}, {summary['date']}, torch {summary['torch']}\n\n")
    f.write("| step | exit | seconds |\n|---|---:|---:|\n")
    f.writelines(f"| {r['step']} | {r['exit']} | {r['seconds']} |\n" for r in rows)
    f.write("\n## Pipeline stages\n\n" + "".join(f"    {t}\n" for t in summary["stage_times"]))
    for name in ("teacher", "student", "longtune", "deltaforcing"):
        if isinstance(summary.get(name), dict):
            f.write(f"\n{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[name].items() if isinstance(v, float)) + "\n")
    if isinstance(summary["bench"], dict):
        f.write("\n## tools.bench\n\n| what | value | unit |\n|---|---:|---|\n")
        for r in summary["bench"]["rows"]:
            v = r["value"] if isinstance(r["value"], str) else f"{r['value']:,.2f}"
            f.write(f"| {r['what']} | {v} | {r['unit']} |\n")
print(open(os.path.join(d, "summary.md")).read())
PY
  exit 0
fi

STAGES=${STAGES:-$([ "$P" = small ] && echo main || echo all)}
case "$P" in tiny|small) ;; *) echo "tools/reproduce.sh: error: preset must be tiny, small or gpu-check, not '$P'" >&2; exit 2;; esac
case "$STAGES" in all|main|final) ;; *) echo "tools/reproduce.sh: error: STAGES must be all, main or final, not '$STAGES'" >&2; exit 2;; esac
if [ "$STAGES" = final ]; then                                  # a part's training seeds, checked before any work
  SEEDS=${SEEDS-3 4 5 6 7}; CONTROLS=${CONTROLS-3 4 5}; RHO0=${RHO0-3 4 5}
  for s in $CONTROLS; do                                        # a control pairs with Delta Forcing of its own chain
    case " $SEEDS " in *" $s "*) ;; *) echo "tools/reproduce.sh: error: control seed $s is not in SEEDS='$SEEDS'" >&2; exit 2;; esac
  done
fi
mkdir -p "$O"
X=""; NS=16; PS=""                                              # REHEARSE: 2 steps per loop of batch 4, 1 seed
[ -n "${REHEARSE:-}" ] && { X="--max_steps=2 --batch=4"; NS=1; PS=1; }
MD="$O/results.md"
dev=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU, %d threads' % torch.get_num_threads())")
printf "# Results, preset %s\n\n%s, %s, torch %s. Made by \`STAGES=%s bash tools/reproduce.sh %s\`.\n" "$P" "$(date -u +%Y-%m-%d)" \
  "$dev" "$($PY -c 'import torch; print(torch.__version__)')" "$STAGES" "$P" > "$MD"
t() { local t0=$SECONDS; echo "=== $*"; "$@"; echo "  ($(( SECONDS - t0 )) s: $*)" | tee -a "$O/times.log"; }

meanw() { $PY -c "import sys, torch; print(sum(torch.load(p, map_location='cpu', weights_only=True)['metrics'][sys.argv[1]]
  for p in sys.argv[2:]) / len(sys.argv[2:]))" "$@"; }   # meanw METRIC CKPT...: the metric's mean over the checkpoints
if [ "$STAGES" = final ]; then   # the final table of the seed plan (docs/results.md): run once, on blocks never looked at.
  # Where one sitting cannot hold it, in parts: SEEDS (baseline, Delta Forcing), CONTROLS (each control) and RHO0 (the
  # rho = 0 chain) name a part's training seeds; a finished checkpoint already there is kept (a part run by hand with
  # these very flags), an unfinished one resumed, so the controls pair with the Delta Forcing runs of the same chain.
  finished() { [ -f "$1" ] && $PY -c "import sys, torch
sys.exit(not torch.load(sys.argv[1], map_location='cpu', weights_only=True)['metrics'])" "$1"; }   # the last save holds metrics
  run() { finished "$1/final/$2_s$3.pt" || t $PY longtune.py --preset="$P" --out_dir="$1" --seed="$3" "${@:4}" \
    --out_name="final/$2_s$3.pt" --resume=True $X; }
  for R in $([ -z "$SEEDS" ] || echo "$O") $([ -z "$RHO0" ] || echo "$O/rho0"); do   # the chain; the rho = 0 chain (nothing to fix)
    mkdir -p "$R/final"
    finished "$R/teacher.pt" || t $PY teacher.py --preset="$P" --out_dir="$R" $([ "$R" = "$O" ] || echo --rho=0) --resume=True $X
    finished "$R/student.pt" || t $PY distill.py --preset="$P" --out_dir="$R" --resume=True $X
  done
  for s in $SEEDS; do                                           # the baseline and Delta Forcing
    run "$O" longtune "$s"
    run "$O" deltaforcing "$s" --trust_region=True
  done
  if [ -n "$CONTROLS" ]; then                                   # this part's Delta Forcing runs: their mean trust
    DF=$(for s in $SEEDS; do echo "$O/final/deltaforcing_s$s.pt"; done)
    W=$(meanw mean_w $DF); SH=$(meanw switched_share $DF)
    C=$($PY -c "print(max(0.001, 1 - (1 - $W) / $SH))")        # schedule-only: the same mean trust (0 would mean off)
  fi
  for s in $CONTROLS; do                                        # each control differs from Delta Forcing in one thing
    run "$O" constw "$s" --trust_region=True --trust_const="$W"
    run "$O" shuffled "$s" --trust_region=True --trust_shuffle=True
    run "$O" schedule "$s" --trust_region=True --trust_schedule="$C"
    run "$O" guidance0 "$s" --guidance=0
  done
  for s in $RHO0; do
    run "$O/rho0" longtune "$s"
    run "$O/rho0" deltaforcing "$s" --trust_region=True
  done
  ck() { for s in $2; do printf "%s/final/%s_s%d.pt," "$3" "$1" "$s"; done; }
  [ -z "$SEEDS" ] || { printf "\n## The final table (evaluation seeds 300-331, the built-in and the drawn schedules)\n" >> "$MD"
  t $PY -m tools.evaluate --preset="$P" --seeds=${PS:-32} --first_seed=300 --drawn=True \
    --reference="$O/final/longtune.pt,$O/final/deltaforcing.pt" --json="$O/final.json" --md="$MD" --svg="$O/final.svg" --ckpts="$O/student.pt,$(ck longtune "$SEEDS" "$O")$(ck deltaforcing \
    "$SEEDS" "$O")$(ck constw "$CONTROLS" "$O")$(ck shuffled "$CONTROLS" "$O")$(ck schedule "$CONTROLS" "$O")$(ck guidance0 "$CONTROLS" "$O")"; }
  if [ -n "$RHO0" ]; then
    printf "\n## The rho = 0 chain on the same block\n" >> "$MD"
    t $PY -m tools.evaluate --preset="$P" --seeds=${PS:-32} --first_seed=300 --drawn=True --reference="$O/rho0/final/longtune.pt" \
      --json="$O/final_rho0.json" --md="$MD" --ckpts="$(ck longtune "$RHO0" "$O/rho0")$(ck deltaforcing "$RHO0" "$O/rho0")"
  fi
  echo "wrote $MD"; exit 0
fi
t $PY teacher.py --preset="$P" --out_dir="$O" $X
t $PY distill.py --preset="$P" --out_dir="$O" $X
$PY - "$O" >> "$MD" <<'PY'
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
$PY -m tools.evaluate --preset="$P" --probe=react --teacher="$O/teacher.pt" --ckpts="$O/student.pt" --seeds=${PS:-4} | tee -a "$MD"
printf "\`\`\`\n" >> "$MD"

SEEDS="0 1 2"; [ "$STAGES" = main ] && SEEDS="0"
for s in $SEEDS; do
  t $PY longtune.py --preset="$P" --out_dir="$O" --seed=$s --out_name=longtune_s$s.pt $X
  t $PY longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --out_name=deltaforcing_s$s.pt $X
done
if [ "$STAGES" = all ]; then                                    # the control: w held at the default's mean trust, all else equal
  W=$(meanw mean_w $(for s in $SEEDS; do echo "$O/deltaforcing_s$s.pt"; done))
  for s in $SEEDS; do
    t $PY longtune.py --preset="$P" --out_dir="$O" --seed=$s --trust_region=True --trust_const="$W" --out_name=df_constw_s$s.pt $X
  done
fi
if [ "$STAGES" = all ]; then                                    # ablations (seed 0): step only, continuity only, with (6')
  t $PY longtune.py --preset="$P" --out_dir="$O" --trust_region=True --tr_continuity=False --out_name=df_step.pt $X
  t $PY longtune.py --preset="$P" --out_dir="$O" --trust_region=True --tr_step=False --out_name=df_continuity.pt $X
  t $PY longtune.py --preset="$P" --out_dir="$O" --trust_region=True --tr_appearance=True --out_name=df_appearance.pt $X
  t $PY longtune.py --preset="$P" --out_dir="$O" --trust_region=True --tr_floor=False --tau=0.005 --out_name=df_nofloor.pt $X
fi
cp "$O/longtune_s0.pt" "$O/longtune.pt"
cp "$O/deltaforcing_s0.pt" "$O/deltaforcing.pt"
ck() { for s in $SEEDS; do printf "%s/%s_s%d.pt," "$O" "$1" $s; done; }
EVAL="$PY -m tools.evaluate --preset=$P --seeds=$NS --first_seed=100"
printf "\n## Long tuning and Delta Forcing (evaluation seeds 100-115)\n" >> "$MD"
ROWS="$O/student.pt,$(ck longtune)$(ck deltaforcing)"
[ "$STAGES" = all ] && ROWS="$ROWS$(ck df_constw)"
t $EVAL --json="$O/results.json" --md="$MD" --ckpts="$ROWS"
[ "$STAGES" = main ] && { echo "wrote $MD"; exit 0; }

printf "\n## Ablations (seed 0)\n" >> "$MD"
t $EVAL --pool=False --json="$O/ablations.json" --md="$MD" \
  --ckpts="$O/longtune_s0.pt,$O/deltaforcing_s0.pt,$O/df_step.pt,$O/df_continuity.pt,$O/df_appearance.pt,$O/df_nofloor.pt,$O/df_constw_s0.pt"

printf "\n## The training policy: the sink relabelled in training (seeds 0, 1)\n" >> "$MD"
for s in 0 1; do
  t $PY longtune.py --preset="$P" --out_dir="$O" --seed=$s --switch_cache=recache --out_name=longtune_rc_s$s.pt
  t $PY longtune.py --preset="$P" --out_dir="$O" --seed=$s --switch_cache=recache --trust_region=True --out_name=df_rc_s$s.pt
done
t $EVAL --json="$O/policy.json" --md="$MD" --ckpts="$O/longtune_rc_s0.pt,$O/longtune_rc_s1.pt,$O/df_rc_s0.pt,$O/df_rc_s1.pt"

printf "\n## Which consistency signal tells training windows apart (DF (3))\n" >> "$MD"
t $PY -m tools.drift --preset="$P" --probe=signals --teacher="$O/teacher.pt" --ckpts="$O/student.pt,$(ck longtune)" \
  --seeds=${PS:-4} --first_seed=100 --md="$MD"

printf "\n## Where drift comes from (seed 0)\n" >> "$MD"
t $PY -m tools.drift --preset="$P" --ckpts="$O/student.pt,$O/longtune_s0.pt,$O/deltaforcing_s0.pt" --seeds=${PS:-8} --first_seed=100 --md="$MD"
t $PY -m tools.drift --preset="$P" --probe=verdicts --teacher="$O/teacher.pt" --ckpts="$O/longtune_s0.pt" --seeds=${PS:-4} --first_seed=100 --md="$MD"
t $PY -m tools.drift --preset="$P" --probe=band --teacher="$O/teacher.pt" --picture="$O/band.png" --seeds=${PS:-4} --first_seed=100 --md="$MD"

printf "\n## The tau frontier (seed 0; tuned on evaluation seeds 0-7, reported on 100-115)\n" >> "$MD"
TAUS=""
for tau in 0.00125 0.005 0.01; do                             # and the default, 0.0025 (deltaforcing_s0)
  t $PY longtune.py --preset="$P" --out_dir="$O" --trust_region=True --tau=$tau --out_name=df_tau$tau.pt
  TAUS="$TAUS$O/df_tau$tau.pt,"
done
$PY -m tools.evaluate --preset="$P" --seeds=8 --first_seed=0 --pool=False --json="$O/tau_tuning.json" \
  --ckpts="$O/longtune_s0.pt,$O/deltaforcing_s0.pt,$TAUS"
t $EVAL --pool=False --json="$O/tau.json" --md="$MD" --svg="$O/frontier.svg" --ckpts="$O/longtune_s0.pt,$O/deltaforcing_s0.pt,$TAUS"

printf "\n## LongLive's one-event windows (--window_events=current, seed 0)\n" >> "$MD"
t $PY longtune.py --preset="$P" --out_dir="$O" --window_events=current --out_name=longtune_current.pt
t $PY longtune.py --preset="$P" --out_dir="$O" --window_events=current --trust_region=True --out_name=deltaforcing_current.pt
t $EVAL --pool=False --json="$O/current.json" --md="$MD" --ckpts="$O/longtune_current.pt,$O/deltaforcing_current.pt"

printf "\n## How identity fails after a switch (seed 0)\n\n\`\`\`\n" >> "$MD"
$PY -m tools.evaluate --preset="$P" --probe=failures --ckpts="$O/longtune_s0.pt,$O/deltaforcing_s0.pt" --first_seed=100 --seeds=16 | tee -a "$MD"
printf "\`\`\`\n" >> "$MD"
$PY - "$O" <<'PY'
import sys, torch
import sample
from world import save_strip
from tools.evaluate import builtin_schedules
# The rule, fixed before looking: the first long schedule of tools.evaluate, the first validation seed (100),
# every 2nd frame from the second teacher window on, as the benchmark streams it (video seed 1000 j + seed).
o, seed, rows = sys.argv[1], 100, []
for name in ("longtune_s0", "deltaforcing_s0"):
    g = sample.load_generator(f"{o}/{name}.pt", torch.device("cpu"))
    W = g.stream["window"]
    j, (_, text, n) = next((j, s) for j, s in enumerate(builtin_schedules(W)) if s[0] == "long")
    x = sample.generate(g, sample.schedule_tensor(text, n, g.chunk, 1, "cpu"), [1000 * j + seed], "recache_window")
    rows.append(x[0, 2 * W::2])
save_strip(f"{o}/strip_long_{seed}.png", torch.stack(rows))
print(f"wrote {o}/strip_long_{seed}.png")
PY

printf "\n## The rho = 0 control (no colour prior per event)\n" >> "$MD"
R="$O/rho0"
mkdir -p "$R"
t $PY teacher.py --preset="$P" --out_dir="$R" --rho=0
t $PY distill.py --preset="$P" --out_dir="$R"
t $PY longtune.py --preset="$P" --out_dir="$R"
t $PY longtune.py --preset="$P" --out_dir="$R" --trust_region=True
t $PY longtune.py --preset="$P" --out_dir="$R" --trust_region=True --tr_floor=False --tau=0.005 --out_name=df_nofloor.pt
t $EVAL --pool=False --json="$O/rho0.json" --md="$MD" --ckpts="$R/student.pt,$R/longtune.pt,$R/deltaforcing.pt,$R/df_nofloor.pt"

for m in keep recache clear; do
  printf "\n## Cache at the switch: %s\n" "$m" >> "$MD"
  t $EVAL --switch_cache=$m --ckpts="$(ck longtune)" --json="$O/cache_$m.json" --md="$MD"
done
echo "wrote $MD"
