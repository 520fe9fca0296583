# L2D on the embedded default, SmolLM2-135M-Instruct, on GSM8K (chat template, answer tokens only).
# CPU-sized budget: 50 steps x 16 problems (800 of 7,473, ~0.1 epoch), about 1 hour on 1 core.
# With a GPU, scale it up (e.g. --max_iters=1000 --batch_size=32 --micro_batch=32 --learning_rate=1e-4).
#   python -m data.gsm8k.prepare
#   python train.py config/l2d_smollm2_gsm8k.py
#   python eval.py --ckpt out-l2d-smollm2-gsm8k/ckpt.pt --task gsm8k --generate False --steps 1,2,4,8 --limit 100
# For guidance, train with classes: guidance_classes = True, and mix in code for a second class:
#   datasets = ["data/gsm8k/smollm2-135m", "data/pycode/smollm2-135m"]
out_dir = "out-l2d-smollm2-gsm8k"
init_from = "smollm2-135m"
method = "l2d"
variant = "lora"
datasets = ["data/gsm8k/smollm2-135m"]
block_size = 512
batch_size = 16
micro_batch = 4
max_iters = 50
learning_rate = 5e-4
warmup_iters = 5
eval_interval = 25
eval_examples = 32
log_interval = 1
