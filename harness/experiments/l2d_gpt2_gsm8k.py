# L2D on GPT-2 (124M) for GSM8K, for users with a GPU (model.safetensors is downloaded once).
#   python -m data.gsm8k.prepare --tokenizer gpt2
#   python train.py harness/experiments/l2d_gpt2_gsm8k.py                       # one GPU
#   torchrun --standalone --nproc_per_node=8 train.py harness/experiments/l2d_gpt2_gsm8k.py
out_dir = "out-l2d-gpt2-gsm8k"
init_from = "gpt2"
method = "l2d"
variant = "lora"
datasets = ["data/gsm8k/gpt2"]
block_size = 1024
batch_size = 32
micro_batch = 16
max_iters = 2000                  # ~8.5 epochs of GSM8K
learning_rate = 1e-4              # the paper's peak lr, warmup and decay
warmup_iters = 100
weight_decay = 0.01
eval_interval = 250
eval_examples = 256
compile = True
