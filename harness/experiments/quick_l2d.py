# The quick recipe, step 2 of 2: the L2D diffusion path around the tiny GPT of config/quick.py
# (which stays frozen), on the same arithmetic data.
#   python train.py harness/experiments/quick_l2d.py
#   python sample.py --init_from out-quick-l2d/ckpt.pt --steps 16 --start "Question: What is 47 + 85?\nAnswer: "
out_dir = "out-quick-l2d"
init_from = "out-quick/ckpt.pt"
method = "l2d"
variant = "full"
datasets = ["data/arithmetic/char"]
flow_dim = 64
batch_size = 64
micro_batch = 32
max_iters = 1000
learning_rate = 1e-3
warmup_iters = 100
eval_interval = 250
eval_examples = 256
log_interval = 50
