# HARP flags for the QTIP runs here: harp_quip's recommended set (its eval.harp_study on
# SmolLM2-135M with E8P12: the paper's rotation and objective, 200 steps, fit on the
# Hessian without held-out sequences, validation-best theta every 10 steps, per-linear
# guard) with QTIP's Hessian block 16 and a target refreshed every HARP_Q_EVERY (10)
# steps: each refresh is a Viterbi pass over every tile of the layer, so this bounds
# the fitting cost to ~200 / 10 + 2 passes (+1 LDLQ pass for the guard's start).
# Not yet validated on QTIP. Needs Hessians collected with --holdout_size and HOLDOUT
# set to that run's hessians/holdout folder before sourcing.
HARP_Q_EVERY=${HARP_Q_EVERY:-10}
source "$(dirname "${BASH_SOURCE[0]}")/harp_paper_flags.sh"
HARP_FLAGS=("${HARP_FLAGS[@]}" --harp_steps "${HARP_STEPS:-200}" --harp_holdout_path "$HOLDOUT"
            --harp_valid_every 10 --harp_guard)
