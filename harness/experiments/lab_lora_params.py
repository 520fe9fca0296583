# LoRA at the L2D path's parameter count, for config/lab_l2d.py: rank 192 trains 2,260,992 parameters, the
# path (full variant, d_f = 64) 2,258,112. alpha = rank keeps the update's scale alpha / rank = 1 of
# config/lab_lora.py. At n_embd = 128 a rank above 128 adds no expressiveness, only parameters.
#   python train.py harness/experiments/lab_lora_params.py
#   python -m harness.seeds --methods l2d,lora,lora_params
exec(open("config/lab_lora.py").read())
out_dir = "out-lab-lora-params"
lora_rank = 192
lora_alpha = 192.0
