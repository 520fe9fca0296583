# The paper's main run: L2D (LoRA variant) around a frozen Llama-3.2-1B-Instruct, one epoch of SmolTalk's
# math, coding and general-QA subsets, 32 conversations a step, AdamW peak lr 1e-4 after 100 warmup steps,
# weight decay 0.01, clip 1.0, bf16; sigma = 64, d_f = 256, LoRA r = 32, alpha = 32 (docs/method.md).
# The weights are gated on the hub: accept the licence there, then (with a token, `huggingface-cli login`)
#   huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --local-dir models/Llama-3.2-1B-Instruct
#   python -m data.smoltalk.prepare --tokenizer models/Llama-3.2-1B-Instruct       # -> data/smoltalk/Llama-3.2-1B-Instruct/
#   torchrun --standalone --nproc_per_node=8 train.py config/l2d_llama3.2_1b_smoltalk.py
#   python eval.py --ckpt out-l2d-llama3.2-1b-smoltalk/ckpt.pt --task gsm8k --steps 1,2,4,8,16 --teacher_forced False
# batch_size is global: 8 GPUs x micro_batch 4 = 32, 1 GPU accumulates 8 micro-steps. max_iters is one epoch
# of the ~0.7M conversations these subsets hold (prepare.py prints the count: set ceil(count / 32)).
out_dir = "out-l2d-llama3.2-1b-smoltalk"
init_from = "models/Llama-3.2-1B-Instruct"
method = "l2d"
variant = "lora"
datasets = ["data/smoltalk/Llama-3.2-1B-Instruct"]
block_size = 2048
flow_dim = 256
sigma = 64.0
lora_rank = 32
lora_alpha = 32.0
guidance_classes = False  # the official default; True trains the class embedding for eval.py --guidance
batch_size = 32
micro_batch = 4
max_iters = 22000
learning_rate = 1e-4
min_lr = 1e-6
warmup_iters = 100
weight_decay = 0.01
grad_clip = 1.0
dtype = "bfloat16"
eval_interval = 1000
eval_examples = 256
log_interval = 10
