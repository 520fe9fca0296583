# The paper's LoRA baseline for config/l2d_llama3.2_1b_smoltalk.py: rank 32 on the base's attention and
# MLP, the same data, steps, batch and lr (it reads that file; only the method differs).
#   torchrun --standalone --nproc_per_node=8 train.py config/lora_llama3.2_1b_smoltalk.py
exec(open("config/l2d_llama3.2_1b_smoltalk.py").read())
out_dir = "out-lora-llama3.2-1b-smoltalk"
method = "lora"
