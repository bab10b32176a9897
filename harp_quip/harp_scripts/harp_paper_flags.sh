# The HARP paper's QuIP# flags (its scripts), sourced by the run scripts here.
HARP_FLAGS=(--harp_b 8 --harp_max_b 8 --harp_passes 1 --harp_ordering_mode stride
            --harp_fixed_mixer had_or_qr --harp_steps 1200 --harp_strategy proxy
            --harp_lr_u 0.03 --harp_lr_v 0.03 --harp_reg_theta 0 --harp_theta_init_scale 0
            --harp_hbd_lambda 0.1 --harp_hbd_block 8 --harp_chunk_size 1048576
            --harp_q_recompute_every 1)
