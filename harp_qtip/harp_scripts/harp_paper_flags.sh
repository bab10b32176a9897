# The HARP paper's QTIP flags (its scripts), as far as this backend implements them;
# sourced by the run scripts here. Its scripts also refresh the proxy target on a
# schedule that re-quantizes 1/16 of the tiles per refresh (--harp_q_recompute_every_final
# 2 --harp_q_refresh_parts 16); we do not implement that schedule: every refresh here is
# a full two-pass Viterbi over every tile, so 1200 steps refreshed every 2 steps cost
# ~600 Viterbi passes over the whole model (HARP_Q_EVERY in the scripts bounds it).
HARP_FLAGS=(--harp_b 8 --harp_max_b 8 --harp_passes 1 --harp_ordering_mode stride
            --harp_fixed_mixer had_or_qr --harp_steps 1200 --harp_strategy proxy
            --harp_lr_u 0.03 --harp_lr_v 0.03 --harp_reg_theta 0 --harp_theta_init_scale 0
            --harp_hbd_lambda 0.1 --harp_hbd_block 16 --harp_chunk_size 4096
            --harp_q_recompute_every "${HARP_Q_EVERY:-2}")
