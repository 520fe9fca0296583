# L2D on the embedded default, SmolLM2-135M-Instruct, on synthetic arithmetic (CPU-sized budget: 150 steps x 16 examples, ~2.4k problems).
#   python -m data.arithmetic.prepare --tokenizer smollm2-135m --digits 3
#   python train.py harness/experiments/l2d_smollm2_arith.py
#   python eval.py --ckpt out-l2d-smollm2-arith/ckpt.pt --task arithmetic --steps 1,2,4,8,16,32
# The baselines on the same data and budget: harness/experiments/lora_smollm2_arith.py, harness/experiments/full_smollm2_arith.py
out_dir = "out-l2d-smollm2-arith"
init_from = "smollm2-135m"
method = "l2d"
variant = "lora"                  # the paper's headline variant
datasets = ["data/arithmetic/smollm2-135m"]
block_size = 512
batch_size = 16
micro_batch = 16
max_iters = 150
learning_rate = 5e-4
warmup_iters = 15
eval_interval = 50
eval_examples = 64
log_interval = 5
