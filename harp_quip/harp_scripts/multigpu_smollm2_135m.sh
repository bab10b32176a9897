#!/usr/bin/env bash
# Multi-GPU check on the offline default (quantize_smollm2_135m.sh with MODES=had, no
# zero-shot): Hessians and quantization with NGPU processes (torchrun, one per GPU, when
# NGPU > 1), export, perplexity. Writes OUT, a JSON with the wall time of every stage,
# the perplexities and the machine. Every stage resumes, so time a fresh RUN folder:
#
#   NGPU=1 bash harp_scripts/multigpu_smollm2_135m.sh
#   NGPU=2 COMPARE_WITH=runs/smollm2_135m_ngpu1 bash harp_scripts/multigpu_smollm2_135m.sh
#
# COMPARE_WITH=RUN0 adds how far this run's Hessians and layer files are from RUN0's
# (eval.compare_runs: bit-identical files, largest difference, files with other codes).
#
#   NGPU=2                   processes for Hessians and quantization
#   RUN=runs/smollm2_135m_ngpu$NGPU
#   OUT=results/smollm2_135m/multigpu/ngpu$NGPU.json
#   LAYER_BATCH=15           groups of 15 of the 30 layers: every NGPU quantizes the same two groups
#                            (same files expected), two processes take one each
#   DEVSET, PPL_ARGS, DEVICE: passed to quantize_smollm2_135m.sh (e.g. a quick CPU check:
#   DEVICE=cpu DEVSET=34 PPL_ARGS="--limit 2")
set -euo pipefail
cd "$(dirname "$0")/.."
export NGPU=${NGPU:-2}
export RUN=${RUN:-runs/smollm2_135m_ngpu$NGPU}
OUT=${OUT:-results/smollm2_135m/multigpu/ngpu$NGPU.json}
export LAYER_BATCH=${LAYER_BATCH:-15}
export MODES=had ZS_TASKS=none BITS=2
export STAGE_TIMES="$RUN/results/stage_milliseconds.txt"
mkdir -p "$RUN/results"
: > "$STAGE_TIMES"
bash harp_scripts/quantize_smollm2_135m.sh

python - "$STAGE_TIMES" "$RUN" "$OUT" "${COMPARE_WITH:-}" <<'EOF'
import datetime
import os
import sys

import torch
from eval.compare_runs import compare_folders
from lib.utils.io import atomic_write_json, read_json

times, run, out, other = sys.argv[1:]
stages = {name: int(ms) / 1000 for name, ms in (line.split() for line in open(times) if line.strip())}
ppl = {name: {f"{r['dataset']}@{r['seqlen']}": r["ppl"] for r in read_json(f"{run}/results/{name}_ppl.json")["results"]}
       for name in ("fp", "had_2bit")}
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
report = {"ngpu": int(os.environ["NGPU"]), "layer_batch": int(os.environ["LAYER_BATCH"]), "run": run,
          "stage_seconds": stages, "ppl": ppl, "gpus": gpus, "torch": torch.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
if other:
    report["compared_with"] = other
    for folder in ("hessians", "had_2bit"):
        result = compare_folders(f"{other}/{folder}", f"{run}/{folder}")
        report[f"{folder}_vs_compared"] = {k: v for k, v in result.items() if k != "per_file"}
atomic_write_json(report, out)
print(f"wrote {out}: " + ", ".join(f"{name} {s:.1f} s" for name, s in stages.items()))
EOF
