# The quick recipe, step 1 of 2: a tiny Llama-style GPT trained from scratch on synthetic
# arithmetic with a character vocabulary (a few minutes on 2 CPU cores).
#   python -m data.arithmetic.prepare --tokenizer char --digits 2
#   python train.py config/quick.py
# Step 2 trains its diffusion path: python train.py harness/experiments/quick_l2d.py
out_dir = "out-quick"
init_from = "scratch"
method = "ar"
datasets = ["data/arithmetic/char"]
family = "llama"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
batch_size = 64
micro_batch = 32
max_iters = 1500
learning_rate = 2e-3
warmup_iters = 100
weight_decay = 0.1
eval_interval = 250
eval_examples = 256
log_interval = 50
