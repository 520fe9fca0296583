# L2D on the embedded default, SmolLM2-135M-Instruct, on synthetic arithmetic (CPU-sized budget).
#   python data/arithmetic/prepare.py --tokenizer smollm2-135m --digits 3
#   python train.py config/l2d_smollm2_arith.py
#   python eval.py --ckpt out-l2d-smollm2-arith/ckpt.pt --task arithmetic --steps 1,2,4,8,16,32
# The baselines on the same data and budget: config/lora_smollm2_arith.py, config/full_smollm2_arith.py
out_dir = "out-l2d-smollm2-arith"
init_from = "smollm2-135m"
method = "l2d"
variant = "lora"                  # the paper's headline variant
datasets = ["data/arithmetic/smollm2-135m"]
block_size = 512
batch_size = 32
micro_batch = 16
max_iters = 300
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 30
eval_interval = 100
eval_examples = 128
log_interval = 10
