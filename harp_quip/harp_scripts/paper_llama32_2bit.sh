#!/usr/bin/env bash
# The HARP paper's 2-bit QuIP# runs on Llama-3.2 (needs Hugging Face hub access and the
# Meta Llama license): SIZE=1B|3B. Published Hessians
# (relaxml/Llama-3.2-*-Instruct-Hessians), E8P12 with --scale_override 0.9, no
# fine-tuning, HARP with the paper's flags, export, wikitext2 + c4 perplexity at
# ctx 8192, zero-shot ArcC/ArcE/PiQA/Wino (0-shot, batch 4).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1B}
RUN=${RUN:-runs/llama32_${SIZE}}
if [ -n "${WORKERS:-}" ]; then
    echo "WORKERS was replaced by NGPU (quantizing processes under torchrun, one per GPU)" >&2; exit 2
fi
NGPU=${NGPU:-1}
PARALLEL=(python -m)
[ "$NGPU" -gt 1 ] && PARALLEL=(torchrun --standalone --nproc_per_node "$NGPU" -m)
LAYER_BATCH=${LAYER_BATCH:-4}
MODEL=meta-llama/Llama-3.2-${SIZE}-Instruct
source harp_scripts/harp_paper_flags.sh

huggingface-cli download relaxml/Llama-3.2-${SIZE}-Instruct-Hessians --local-dir "$RUN/hessians"
"${PARALLEL[@]}" quantize_llama.quantize_finetune_llama --base_model $MODEL --load_dtype float16 \
    --hessian_path "$RUN/hessians" --save_path "$RUN/harp_2bit" \
    --layer_batch "$LAYER_BATCH" --codebook E8P12 --incoh_mode harp --scale_override 0.9 "${HARP_FLAGS[@]}"
python -m quantize_llama.hfize_llama --skip_done --quantized_path "$RUN/harp_2bit" --load_dtype float16 \
    --hf_output_path "$RUN/harp_2bit_hf"
python -m eval.eval_ppl --skip_done --hf_path "$RUN/harp_2bit_hf" --seqlen 8192 --datasets wikitext2,c4 \
    --no_use_cuda_graph --output "$RUN/results/harp_2bit_ppl.json"
python -m eval.eval_zeroshot --skip_done --hf_path "$RUN/harp_2bit_hf" --tasks arc_challenge,arc_easy,piqa,winogrande \
    --batch_size 4 --output "$RUN/results/harp_2bit_zeroshot.json"
