# L2D on the embedded default, SmolLM2-135M-Instruct, on GSM8K (chat template, answer tokens only).
#   python data/gsm8k/prepare.py
#   python train.py config/l2d_smollm2_gsm8k.py
#   python eval.py --ckpt out-l2d-smollm2-gsm8k/ckpt.pt --task gsm8k --steps 1,2,4,8,16 --limit 100
# Mix in code so guidance has two classes: datasets = ["data/gsm8k/smollm2-135m", "data/pycode/smollm2-135m"]
out_dir = "out-l2d-smollm2-gsm8k"
init_from = "smollm2-135m"
method = "l2d"
variant = "lora"
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
