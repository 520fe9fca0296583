# The CPU lab, step 1 of 2: a tiny Llama-style GPT pretrained from scratch on 1-2-digit + and - only,
# so that multiplication, the finetuning task of step 2, is new to it. The character vocabulary is the
# quick recipe's (it has every operator), so both datasets share one tokenizer.
#   python -m data.arithmetic.prepare --tokenizer char --digits 2        # the vocabulary (quick recipe's data)
#   python -m data.arithmetic.prepare --tokenizer data/arithmetic/char/vocab.json --digits 2 --ops "+-" --n_train 9000 --out data/arithmetic/lab-addsub
#   python -m data.arithmetic.prepare --tokenizer data/arithmetic/char/vocab.json --digits 2 --ops "*" --n_train 4000 --n_confirm 500 --out data/arithmetic/lab-mul
#   python train.py config/lab_base.py
# Step 2, at equal data and steps: config/lab_l2d.py, config/lab_lora.py, harness/experiments/lab_full.py, harness/experiments/lab_ar.py
exec(open("config/quick.py").read())
out_dir = "out-lab-base"
datasets = ["data/arithmetic/lab-addsub"]
