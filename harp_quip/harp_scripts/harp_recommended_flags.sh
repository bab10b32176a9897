# Our recommended HARP flags (the winner of eval.harp_study on SmolLM2-135M, 2 bit: variant
# guard_200 of harp_scripts/study_variants.json), sourced by the run scripts here.
# The HARP paper's rotation and objective, 200 steps, plus:
#   --harp_holdout_path  fit on the Hessian without the held-out calibration sequences
#   --harp_valid_every   every 10 steps score the held-out Hessian; keep the validation-best theta
#   --harp_guard         keep HARP on a linear only if its real LDLQ proxy error on the held-out
#                        Hessian beats the start's; otherwise quantize that linear from the start
# Needs Hessians collected with --holdout_size (the scripts use 32 of 256 sequences) and
# HOLDOUT set to that run's hessians/holdout folder before sourcing.
source "$(dirname "${BASH_SOURCE[0]}")/harp_paper_flags.sh"
HARP_FLAGS=("${HARP_FLAGS[@]}" --harp_steps 200 --harp_holdout_path "$HOLDOUT" --harp_valid_every 10 --harp_guard)
