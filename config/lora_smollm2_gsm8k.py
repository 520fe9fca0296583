# The LoRA baseline for config/l2d_smollm2_gsm8k.py: same data and budget.
#   python data/gsm8k/prepare.py
#   python train.py config/lora_smollm2_gsm8k.py
#   python eval.py --ckpt out-lora-smollm2-gsm8k/ckpt.pt --task gsm8k --steps 1 --limit 100
out_dir = "out-lora-smollm2-gsm8k"
init_from = "smollm2-135m"
method = "lora"
datasets = ["data/gsm8k/smollm2-135m"]
block_size = 512
batch_size = 32
micro_batch = 8
max_iters = 200                   # ~0.9 epoch of GSM8K; the paper trains 1 epoch of 892k examples
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 20
eval_interval = 50
eval_examples = 64
log_interval = 5
