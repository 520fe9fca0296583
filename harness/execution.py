"""
Running model-written Python against its tests (eval.py --task humaneval): each program in its own child
process, a fresh `python -I` with an empty environment and no stdin, in a temporary directory (not the
checkout), killed after `timeout` seconds, with limits on CPU time, memory, file size and child processes,
and socket creation raising before the program starts. That stops a wrong or looping completion from hurting
the run or the checkout; it is no sandbox against hostile code (run untrusted models in a container or VM).
"""

import os
import subprocess
import sys
import tempfile

# The child's first lines: limits and the network guard, set before any model-written code runs.
GUARD = '''
import resource, socket
for limit, value in ((resource.RLIMIT_CPU, {cpu}), (resource.RLIMIT_AS, {memory}), (resource.RLIMIT_FSIZE, {fsize}),
                     (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled for evaluated code")
socket.socket = socket.create_connection = socket.socketpair = socket.getaddrinfo = _no_network
del resource, socket, limit, value
'''
# A continuation's function ends where the text goes back to column 0 (Codex's stop sequences).
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def run_program(program, timeout=10.0, memory_mb=2048):
    """Whether `program` (Python source) exits with status 0 within `timeout` seconds, in a guarded child."""
    guard = GUARD.format(cpu=max(1, int(timeout) + 1), memory=memory_mb * 2**20, fsize=16 * 2**20)
    with tempfile.TemporaryDirectory(prefix="l2d-exec-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(guard + "\n" + program)
        try:
            done = subprocess.run([sys.executable, "-I", path], cwd=workdir, env={}, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def completion_code(problem, text):
    """The function a generation `text` gives for a HumanEval `problem` (a test.jsonl row). A chat model
    answers with a fenced code block holding the whole function: its code follows the prompt. Otherwise the
    text continues the prompt's signature and docstring, cut where the function ends (STOPS)."""
    if "```" in text:  # the first fenced block that defines the function, else the first with any code
        blocks = [b.split("\n", 1)[1] if "\n" in b else "" for b in text.split("```")[1::2]]  # after ```python
        defines = [b for b in blocks if f"def {problem['entry_point']}" in b]
        code = (defines or [b for b in blocks if b.strip()] or [""])[0]
        # a whole function redefines the prompt's stub, whose imports and helpers it keeps
        return problem["code_prompt"] + ("\n" if defines else "") + code
    cut = min([len(text)] + [text.index(stop) for stop in STOPS if stop in text])
    return problem["code_prompt"] + text[:cut]


def humaneval_program(problem, text):
    """The completed function, HumanEval's `check` and the call check(entry_point): its exit status is the verdict."""
    return f"{completion_code(problem, text)}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
