# The LoRA baseline (rank 32 on attention + MLP) for config/lab_l2d.py: the same base, data, batch, steps
# and lr; only the method differs.
#   python train.py config/lab_lora.py
#   python eval.py --ckpt out-lab-lora/ckpt.pt --data data/arithmetic/lab-mul --gen_batch_size 50 --max_new_tokens 8
exec(open("config/lab_l2d.py").read())
out_dir = "out-lab-lora"
method = "lora"
