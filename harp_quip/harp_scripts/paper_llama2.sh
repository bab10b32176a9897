#!/usr/bin/env bash
# The HARP paper's QuIP# runs on Llama-2 (needs Hugging Face hub access and the Meta
# Llama license): SIZE=7b|13b|70b, BITS=2|3|4 (3 and 4 bit: 7b and 13b in the paper).
# Published Hessians (6144 sequences of 4096 tokens, relaxml/Hessians-Llama-2-*-6144),
# no fine-tuning, HARP with the paper's flags and, where the paper has it, the RHT
# baseline (70B at 2 bit, all 3/4-bit runs); export; wikitext2 + c4 perplexity at
# ctx 4096; zero-shot ArcC/ArcE/PiQA/Wino (0-shot) with the paper's batch sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-7b}
BITS=${BITS:-2}
RUN=${RUN:-runs/llama2_${SIZE}}
if [ -n "${WORKERS:-}" ]; then
    echo "WORKERS was replaced by NGPU (quantizing processes under torchrun, one per GPU)" >&2; exit 2
fi
NGPU=${NGPU:-1}
PARALLEL=(python -m)
[ "$NGPU" -gt 1 ] && PARALLEL=(torchrun --standalone --nproc_per_node "$NGPU" -m)
LAYER_BATCH=${LAYER_BATCH:-4}
MODEL=meta-llama/Llama-2-${SIZE}-hf
source harp_scripts/harp_paper_flags.sh
case "$BITS" in
    2) CODEBOOK=(--codebook E8P12 --scale_override 0.9)
       if [ "$SIZE" = 70b ]; then MODES="harp had"; ZS_BATCH=16; else MODES="harp"; ZS_BATCH=4; fi ;;
    3) CODEBOOK=(--codebook E8P12RVQ3B --scale_override -1 --resid_scale_override -1); MODES="harp had"; ZS_BATCH=64 ;;
    4) CODEBOOK=(--codebook E8P12RVQ4B --scale_override -1 --resid_scale_override -1); MODES="harp had"; ZS_BATCH=64 ;;
    *) echo "BITS must be 2, 3 or 4" >&2; exit 2 ;;
esac
MODES=${MODES_OVERRIDE:-$MODES}

huggingface-cli download relaxml/Hessians-Llama-2-${SIZE}-6144 --local-dir "$RUN/hessians"

for MODE in $MODES; do
    OUTDIR="$RUN/${MODE}_${BITS}bit"
    EXTRA=()
    [ "$MODE" = harp ] && EXTRA=("${HARP_FLAGS[@]}")
    "${PARALLEL[@]}" quantize_llama.quantize_finetune_llama --base_model $MODEL --load_dtype float16 \
        --hessian_path "$RUN/hessians" --save_path "$OUTDIR" \
        --layer_batch "$LAYER_BATCH" --incoh_mode "$MODE" "${CODEBOOK[@]}" "${EXTRA[@]}"
    python -m quantize_llama.hfize_llama --skip_done --quantized_path "$OUTDIR" --load_dtype float16 \
        --hf_output_path "${OUTDIR}_hf"
    python -m eval.eval_ppl --skip_done --hf_path "${OUTDIR}_hf" --seqlen 4096 --datasets wikitext2,c4 \
        --no_use_cuda_graph --output "$RUN/results/${MODE}_${BITS}bit_ppl.json"
    python -m eval.eval_zeroshot --skip_done --hf_path "${OUTDIR}_hf" --tasks arc_challenge,arc_easy,piqa,winogrande \
        --batch_size "$ZS_BATCH" --output "$RUN/results/${MODE}_${BITS}bit_zeroshot.json"
done
