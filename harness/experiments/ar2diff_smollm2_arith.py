# AR2Diff (ar2diff.py) on the embedded default, SmolLM2-135M-Instruct, for harness/experiments/l2d_smollm2_arith.py's
# data, batch and steps: every weight trains, at full finetuning's lr (harness/experiments/full_smollm2_arith.py). The
# answer span is the longest train answer and its end token (<|im_end|>).
#   python -m data.arithmetic.prepare --tokenizer smollm2-135m --digits 3
#   python train.py harness/experiments/ar2diff_smollm2_arith.py
#   python eval.py --ckpt out-ar2diff-smollm2-arith/ckpt.pt --task arithmetic --limit 200 --steps 1,2,5,10,20 --candidates 1,4,8 --gen_batch_size 16
exec(open("harness/experiments/l2d_smollm2_arith.py").read())
out_dir = "out-ar2diff-smollm2-arith"
method = "ar2diff"
learning_rate = learning_rate / 10
