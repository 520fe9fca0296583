# The full-finetuning baseline (all weights; a lower lr) for config/l2d_smollm2_arith.py: same data and budget.
#   python data/arithmetic/prepare.py --tokenizer smollm2-135m --digits 3
#   python train.py config/full_smollm2_arith.py
#   python eval.py --ckpt out-full-smollm2-arith/ckpt.pt --task arithmetic --steps 1
out_dir = "out-full-smollm2-arith"
init_from = "smollm2-135m"
method = "full"
datasets = ["data/arithmetic/smollm2-135m"]
block_size = 512
batch_size = 32
micro_batch = 16
max_iters = 300
learning_rate = 5e-5
min_lr = 5e-6
warmup_iters = 30
eval_interval = 100
eval_examples = 128
log_interval = 10
