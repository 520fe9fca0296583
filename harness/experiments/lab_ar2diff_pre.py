# AR2Diff_N for the CPU lab (the paper's AR2Diff_N: the diffusion loss carried on for N steps on generic data
# before the task): N = 1,500 steps of AR2Diff training of the lab base on its own pretraining data (1-2-digit
# + and -), batch 64, lr 1e-3. Then harness/experiments/lab_ar2diff_n.py finetunes it on x as harness/experiments/lab_ar2diff.py does.
#   python train.py harness/experiments/lab_ar2diff_pre.py
exec(open("harness/experiments/lab_ar2diff.py").read())
out_dir = "out-lab-ar2diff-pre"
datasets = ["data/arithmetic/lab-addsub"]
max_iters = 1500
