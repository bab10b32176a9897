#!/usr/bin/env bash
# The HARP paper's 2-bit QuIP# runs on Llama-2 (needs Hugging Face hub access and the
# Meta Llama license): SIZE=7b|13b|70b. Published Hessians (6144 sequences of 4096
# tokens, relaxml/Hessians-Llama-2-*-6144), E8P12 with --scale_override 0.9, no
# fine-tuning, HARP with the paper's flags (70B also runs the RHT baseline), export,
# wikitext2 + c4 perplexity at ctx 4096. Zero-shot evaluation joins when eval_zeroshot lands.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-7b}
RUN=${RUN:-runs/llama2_${SIZE}}
WORKERS=${WORKERS:-1}
MODEL=meta-llama/Llama-2-${SIZE}-hf
MODES=${MODES:-harp}
[ "$SIZE" = 70b ] && MODES=${MODES_70B:-harp had}
source harp_scripts/harp_paper_flags.sh

huggingface-cli download relaxml/Hessians-Llama-2-${SIZE}-6144 --local-dir "$RUN/hessians"

for MODE in $MODES; do
    EXTRA=()
    [ "$MODE" = harp ] && EXTRA=("${HARP_FLAGS[@]}")
    python -m quantize_llama.quantize_finetune_llama --base_model $MODEL --load_dtype float16 \
        --hessian_path "$RUN/hessians" --save_path "$RUN/${MODE}_2bit" --num_workers "$WORKERS" \
        --codebook E8P12 --incoh_mode "$MODE" --scale_override 0.9 "${EXTRA[@]}"
    python -m quantize_llama.hfize_llama --quantized_path "$RUN/${MODE}_2bit" --load_dtype float16 \
        --hf_output_path "$RUN/${MODE}_2bit_hf"
    python -m eval.eval_ppl --hf_path "$RUN/${MODE}_2bit_hf" --seqlen 4096 --datasets wikitext2,c4 \
        --no_use_cuda_graph --output "$RUN/results/${MODE}_2bit_ppl.json"
done
