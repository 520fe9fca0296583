# The LoRA baseline for harness/experiments/l2d_smollm2_smoltalk.py at equal data, steps, batch and lr.
#   python train.py harness/experiments/lora_smollm2_smoltalk.py
exec(open("harness/experiments/l2d_smollm2_smoltalk.py").read())
out_dir = "out-lora-smollm2-smoltalk"
method = "lora"
