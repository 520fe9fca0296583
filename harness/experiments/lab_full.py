# The full-finetuning baseline (every base weight) for config/lab_l2d.py: the same base, data, batch and
# steps, the lr 10x lower, as usual when every weight moves.
#   python train.py harness/experiments/lab_full.py
#   python eval.py --ckpt out-lab-full/ckpt.pt --data data/arithmetic/lab-mul --gen_batch_size 50 --max_new_tokens 8
exec(open("config/lab_l2d.py").read())
out_dir = "out-lab-full"
method = "full"
learning_rate = learning_rate / 10
