#!/usr/bin/env bash
# QTIP + HARP on Llama-2 (needs Hugging Face hub access and the Meta Llama license):
# SIZE=7b|13b|70b, K=2|3|4 bits (--scale_override 0.9 at 2 bit as in QTIP, else SCALE,
# default -1 = the code's RMS). The published Hessians (6144 sequences of 4096 tokens,
# relaxml/Hessians-Llama-2-*-6144; QTIP uses QuIP#'s), no fine-tuning, the RHT and HARP,
# export, wikitext2 + c4 perplexity at ctx 4096, zero-shot ArcC/ArcE/PiQA/Wino (0-shot).
#
#   HARP_SET=paper   the HARP paper's QTIP flags (harp_paper_flags.sh; every target
#                    refresh is a full Viterbi pass here, ~600 passes at 1200 steps)
#   HARP_SET=fast    the same with HARP_STEPS=200 steps refreshed every HARP_Q_EVERY=10
#                    (the published Hessians have no held-out part: no guard/validation)
#   MODES="had harp" NGPU=1 LAYER_BATCH=1 RUN=runs/llama2_7b_qtip
#
# Cost: one Viterbi pass over Llama-2-7B is ~25.3M tiles of 256 weights;
# `python tools/bench_viterbi.py --device cuda` measures a GPU's tiles/s and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-7b}
K=${K:-2}
RUN=${RUN:-runs/llama2_${SIZE}_qtip}
NGPU=${NGPU:-1}
PARALLEL=(python -m)
[ "$NGPU" -gt 1 ] && PARALLEL=(torchrun --standalone --nproc_per_node "$NGPU" -m)
LAYER_BATCH=${LAYER_BATCH:-1}
MODES=${MODES:-had harp}
HARP_SET=${HARP_SET:-paper}
MODEL=meta-llama/Llama-2-${SIZE}-hf
case "$K" in
    2) SCALE=${SCALE:-0.9} ;;
    3|4) SCALE=${SCALE:--1} ;;
    *) echo "K must be 2, 3 or 4" >&2; exit 2 ;;
esac
case "$HARP_SET" in
    paper) source harp_scripts/harp_paper_flags.sh ;;
    fast) source harp_scripts/harp_paper_flags.sh
          HARP_FLAGS=("${HARP_FLAGS[@]}" --harp_steps "${HARP_STEPS:-200}" --harp_q_recompute_every "${HARP_Q_EVERY:-10}") ;;
    *) echo "HARP_SET must be paper or fast (the published Hessians have no held-out part)" >&2; exit 2 ;;
esac
TRELLIS=(--codebook bitshift --L 16 --K "$K" --V 2 --td_x 16 --td_y 16 --decode_mode quantlut_sym
         --tlut_bits 9 --scale_override "$SCALE")

huggingface-cli download relaxml/Hessians-Llama-2-${SIZE}-6144 --local-dir "$RUN/hessians"

for MODE in $MODES; do
    OUTDIR="$RUN/qtip_${MODE}_${K}bit"
    EXTRA=()
    [ "$MODE" = harp ] && EXTRA=("${HARP_FLAGS[@]}")
    "${PARALLEL[@]}" quantize_llama.quantize_finetune_llama --base_model $MODEL --load_dtype float16 \
        --hessian_path "$RUN/hessians" --save_path "$OUTDIR" \
        --layer_batch "$LAYER_BATCH" --incoh_mode "$MODE" "${TRELLIS[@]}" "${EXTRA[@]}"
    python -m quantize_llama.hfize_llama --skip_done --quantized_path "$OUTDIR" --load_dtype float16 \
        --hf_output_path "${OUTDIR}_hf"
    python -m eval.eval_ppl --skip_done --hf_path "${OUTDIR}_hf" --seqlen 4096 --datasets wikitext2,c4 \
        --no_use_cuda_graph --output "$RUN/results/qtip_${MODE}_${K}bit_ppl.json"
    python -m eval.eval_zeroshot --skip_done --hf_path "${OUTDIR}_hf" --tasks arc_challenge,arc_easy,piqa,winogrande \
        --batch_size 8 --output "$RUN/results/qtip_${MODE}_${K}bit_zeroshot.json"
done
