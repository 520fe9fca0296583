# The continued-training baseline for config/lab_l2d.py: the base's own next-token training (method=ar,
# every weight) carried on over the multiplication data, at the path's lr rather than full finetuning's
# lr/10 (harness/experiments/lab_full.py); the same base, data, batch and steps.
#   python train.py harness/experiments/lab_ar.py
#   python eval.py --ckpt out-lab-ar/ckpt.pt --data data/arithmetic/lab-mul --gen_batch_size 50 --max_new_tokens 8
exec(open("config/lab_l2d.py").read())
out_dir = "out-lab-ar"
method = "ar"
