# AR2Diff_1500 for the CPU lab: harness/experiments/lab_ar2diff.py (x, 3,000 steps) started from the lab base after 1,500
# steps of the diffusion loss on its own + and - data (harness/experiments/lab_ar2diff_pre.py, run that first).
#   python train.py harness/experiments/lab_ar2diff_n.py
#   python eval.py --ckpt out-lab-ar2diff-n/ckpt.pt --data data/arithmetic/lab-mul --steps 1,2,5,10,20 --candidates 1,4,8 --gen_batch_size 50
exec(open("harness/experiments/lab_ar2diff.py").read())
out_dir = "out-lab-ar2diff-n"
init_from = "out-lab-ar2diff-pre/ckpt.pt"
