# The paper's recipe on the embedded SmolLM2-135M-Instruct, sized for one GPU: the same SmolTalk mix,
# 32 conversations a step of up to 1,024 tokens, AdamW peak lr 1e-4, bf16, sigma = 64, d_f = 256, LoRA
# r = 32. 2,000 steps (64k conversations, ~9% of an epoch); raise max_iters to ~22,000 for the full epoch.
#   python -m data.smoltalk.prepare --max_len 1024                      # -> data/smoltalk/smollm2-135m/
#   python train.py harness/experiments/l2d_smollm2_smoltalk.py                      # or torchrun --nproc_per_node=N
#   python -m data.humaneval.prepare && python -m data.gsm8k.prepare
#   python eval.py --ckpt out-l2d-smollm2-smoltalk/ckpt.pt --task gsm8k --steps 1,2,4,8,16 --limit 200 --gen_batch_size 16
#   python eval.py --ckpt out-l2d-smollm2-smoltalk/ckpt.pt --task humaneval --steps 1,2,4,8 --estimate sample --max_new_tokens 384 --gen_batch_size 16
exec(open("config/l2d_llama3.2_1b_smoltalk.py").read())
out_dir = "out-l2d-smollm2-smoltalk"
init_from = "smollm2-135m"
datasets = ["data/smoltalk/smollm2-135m"]
block_size = 1024
micro_batch = 16
max_iters = 2000
eval_interval = 250
