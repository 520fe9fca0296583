# The CPU lab, step 2, AR2Diff (ar2diff.py): the base of config/lab_base.py, every weight trained, as a
# discrete diffusion model of the whole answer (prefix-LM attention, uniform-token corruption, L1 + L2),
# at config/lab_l2d.py's data, batch, steps and lr (1e-3, also the paper's AR2Diff finetuning lr).
# The answer span is the longest train answer and its end token: 5 characters for 1-2-digit x.
#   python train.py harness/experiments/lab_ar2diff.py
#   python eval.py --ckpt out-lab-ar2diff/ckpt.pt --data data/arithmetic/lab-mul --steps 1,2,5,10,20 --candidates 1,4,8 --gen_batch_size 50
exec(open("config/lab_l2d.py").read())
out_dir = "out-lab-ar2diff"
method = "ar2diff"
