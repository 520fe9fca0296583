# The full-finetuning baseline (all base weights) for harness/experiments/l2d_smollm2_arith.py: it reads that file,
# so data, batch and steps are the same; the lr is 10x lower, as usual when every weight moves.
#   python train.py harness/experiments/full_smollm2_arith.py
#   python eval.py --ckpt out-full-smollm2-arith/ckpt.pt --task arithmetic --steps 1
exec(open("harness/experiments/l2d_smollm2_arith.py").read())
out_dir = "out-full-smollm2-arith"
method = "full"
learning_rate = learning_rate / 10
