"""`forkrun.run(...)`: subprocess.run for `python script.py ...` and `python -m module ...`, minus the
seconds each fresh interpreter spends importing torch.

A server process (this file run as a script, in the command's environment less PYTEST_CURRENT_TEST;
one per such environment) imports torch and numpy once and then forks a child per command. The child
is a real, separate process: it takes the command's working folder, environment, argv and
sys.path[0], writes stdout and stderr to their own files, and runs the script as __main__ through
runpy, so its exit code, what it prints and any traceback are the interpreter's own (sys.argv[0] is
the script's absolute path, as __file__ is in both). Nothing the script does (seeds, threads, chdir,
module caches) reaches the tests or the next command.

Not forked, but run with subprocess.run as before: other interpreter options, a stdin or other
subprocess.run argument this does not model, an environment that differs from the tests' own in a
PYTHON* or LD_* variable (e.g. a PYTHONPATH with a stand-in package: one-off), and every command when
L2D_TESTS_FORK=0 (to check that the suite passes the same with real interpreters)."""
import io
import json
import os
import select
import signal
import subprocess
import sys
import tempfile

BASE_ENV = dict(os.environ)  # the environment the tests started in
ENABLED = os.environ.get("L2D_TESTS_FORK", "1") != "0"
PER_TEST = "PYTEST_CURRENT_TEST"  # pytest sets it per test: the child gets it, the server need not have it
MAX_SERVERS = 4
_servers = {}  # _key(the server's environment) -> (Popen, request pipe, reply pipe)


def _key(env):
    return frozenset((k, v) for k, v in env.items() if k != PER_TEST)


def _forkable(args, env, kwargs):
    if not ENABLED or set(kwargs) - {"capture_output", "text", "timeout", "check", "cwd"} \
            or not kwargs.get("capture_output"):
        return False
    if len(args) < 2 or args[0] != sys.executable or (args[1].startswith("-") and args[1] != "-m") \
            or (args[1] == "-m" and len(args) < 3):
        return False
    if _key(env) in _servers:
        return True
    differs = {k for k in set(env) | set(BASE_ENV) if env.get(k) != BASE_ENV.get(k)}
    return len(_servers) < MAX_SERVERS and not any(k.startswith(("PYTHON", "LD_")) for k in differs)


def _server(env):
    key = _key(env)
    if key not in _servers:
        env = dict(key)
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(request_r), str(reply_w)], env=env,
                                pass_fds=(request_r, reply_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(request_r)
        os.close(reply_w)
        _servers[key] = (proc, os.fdopen(request_w, "w", buffering=1), os.fdopen(reply_r, "r", buffering=1))
    return _servers[key]


def _decode(data, text):
    return io.TextIOWrapper(io.BytesIO(data)).read() if text else data  # as subprocess.run(text=True) does


def run(args, *, env=None, cwd=None, timeout=None, check=False, text=False, capture_output=False, **kwargs):
    """subprocess.run(args, ...) with a forked child where it can be (see the module docstring)."""
    args = [str(a) for a in args]
    env = dict(os.environ) if env is None else dict(env)
    options = dict(capture_output=capture_output, text=text, timeout=timeout, check=check, cwd=cwd, **kwargs)
    if not _forkable(args, env, {k: v for k, v in options.items() if v is not None and v is not False}):
        return subprocess.run(args, env=env, **options)
    _, request, reply = _server(env)
    out, err = (tempfile.mkstemp(prefix="forkrun-") for _ in range(2))
    try:
        request.write(json.dumps(dict(argv=args[1:], cwd=os.path.abspath(cwd or os.getcwd()), env=env, stdout=out[1],
                                      stderr=err[1])) + "\n")
        pid = int(reply.readline())
        ready, _, _ = select.select([reply], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        returncode = int(reply.readline())
        stdout, stderr = (_decode(open(path, "rb").read(), text) for _, path in (out, err))
    finally:
        for fd, path in (out, err):
            os.close(fd)
            os.unlink(path)
    if not ready:
        raise subprocess.TimeoutExpired(args, timeout, stdout, stderr)
    result = subprocess.CompletedProcess(args, returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


# --- the server ---------------------------------------------------------------------------------------

def _serve(request_fd, reply_fd):
    """Fork a child per request line; in the parent, reply its pid and then its exit code. Returns the
    request in the child (which then becomes the command); exits at the end of the requests."""
    import numpy  # noqa: F401  (what every script imports first, and what takes the time)
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.nn.functional  # noqa: F401
    import gc
    gc.freeze()  # the children's collections skip what was imported here: no copy-on-write of it (~0.5 s a child)
    requests, replies = os.fdopen(request_fd, "r"), os.fdopen(reply_fd, "w", buffering=1)
    for line in requests:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            requests.close()
            replies.close()
            return json.loads(line)
        replies.write(f"{pid}\n")
        _, status = os.waitpid(pid, 0)
        replies.write(f"{os.waitstatus_to_exitcode(status)}\n")
    sys.exit(0)


if __name__ == "__main__":
    job = _serve(int(sys.argv[1]), int(sys.argv[2]))
    # the child: become `python ARGV...` run in job["cwd"]
    import runpy

    import numpy
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        f = os.open(path, os.O_WRONLY)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    numpy.random.seed()  # a fresh interpreter's numpy draws its own seed (Python's random reseeds at fork itself)
    argv = job["argv"]
    del _serve, job
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file first
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(os.path.abspath(argv[0]), run_name="__main__")
