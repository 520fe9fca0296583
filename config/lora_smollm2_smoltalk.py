# The LoRA baseline for config/l2d_smollm2_smoltalk.py at equal data, steps, batch and lr.
#   python train.py config/lora_smollm2_smoltalk.py
exec(open("config/l2d_smollm2_smoltalk.py").read())
out_dir = "out-lora-smollm2-smoltalk"
method = "lora"
