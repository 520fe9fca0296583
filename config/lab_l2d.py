# The CPU lab, step 2: the L2D path (full variant, d_f = 64) around the frozen base of config/lab_base.py,
# trained on 1-2-digit multiplication, which the base never saw. 3,000 steps x 64 problems (48 epochs of
# the 4,000 training problems); the baselines at the same data and steps: lab_lora.py, lab_full.py, lab_ar.py.
# sigma = 16, not the paper's 64: what x_t tells about the token depends on sigma / sqrt(d_f) (64 / 16 in
# the paper, at d_f = 256); at d_f = 64, sigma = 64 hides the token until t ~ 0.95 and the path reads less
# of it, sigma = 16 opens the window at t ~ 0.75 and did best of {64, 16, 4} (RESULTS.md, "The CPU lab").
#   python train.py config/lab_l2d.py
#   python eval.py --ckpt out-lab-l2d/ckpt.pt --data data/arithmetic/lab-mul --steps 1,4,16 --gen_batch_size 50 --max_new_tokens 8
out_dir = "out-lab-l2d"
init_from = "out-lab-base/ckpt.pt"
method = "l2d"
variant = "full"
datasets = ["data/arithmetic/lab-mul"]
flow_dim = 64
sigma = 16.0
batch_size = 64
micro_batch = 32
max_iters = 3000
learning_rate = 1e-3
warmup_iters = 100
eval_interval = 500
eval_examples = 256
log_interval = 100
