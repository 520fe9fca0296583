# The LoRA baseline (rank 32 on attention + MLP, the base's own weights) for harness/experiments/l2d_smollm2_arith.py:
# it reads that file, so data, batch, steps and lr are the same; only the method differs.
#   python train.py harness/experiments/lora_smollm2_arith.py
#   python eval.py --ckpt out-lora-smollm2-arith/ckpt.pt --task arithmetic --steps 1
exec(open("harness/experiments/l2d_smollm2_arith.py").read())
out_dir = "out-lora-smollm2-arith"
method = "lora"
