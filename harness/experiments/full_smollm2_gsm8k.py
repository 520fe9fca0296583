# The full-finetuning baseline (all base weights) for config/l2d_smollm2_gsm8k.py: it reads that file,
# so data, batch and steps are the same; the lr is 10x lower, as usual when every weight moves.
#   python train.py harness/experiments/full_smollm2_gsm8k.py
#   python eval.py --ckpt out-full-smollm2-gsm8k/ckpt.pt --task gsm8k --steps 1
exec(open("config/l2d_smollm2_gsm8k.py").read())
out_dir = "out-full-smollm2-gsm8k"
method = "full"
learning_rate = learning_rate / 10
