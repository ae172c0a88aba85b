"""Run ``python -m autoprune ARGS`` many times, each in its own process, without importing torch each time.

Started as ``python command_server.py`` (a fresh interpreter, nothing of pytest in it), it imports
``autoprune.cli`` once, reads one JSON request a line from stdin until EOF, and runs each in a child
forked from itself: the child takes the request's working folder and environment, writes to its own
stdout and stderr files, and runs ``autoprune/__main__.py`` as ``python -m autoprune`` does (runpy), so
the exit status, what reaches stderr and an uncaught exception's traceback are a real process's. It
prints one JSON line per request, ``{"id": ..., "returncode": ...}``, as each child ends; at most
``AUTOPRUNE_TEST_PARALLEL`` (default 4) run at once.

What a fresh ``python -m autoprune`` would add is the import itself (about 4 s of CPU each: torch,
torchvision, optuna); ``tests/test_bad_input.py`` runs its cases that way too, in the slow tier.
"""

import atexit
import json
import os
import runpy
import sys
import traceback

import autoprune.cli  # noqa: F401  (the import every child shares)


def _child(request: dict) -> int:
    """In the forked child: the request's folder, environment and files, then the command itself."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["autoprune", *request["args"]]
    sys.path[0] = os.getcwd()  # as -m puts the working folder first, not this file's
    try:
        runpy.run_module("autoprune", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:  # as the interpreter ends on SystemExit
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  as the interpreter ends on an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    requests = [json.loads(line) for line in sys.stdin if line.strip()]
    parallel = int(os.environ.get("AUTOPRUNE_TEST_PARALLEL") or 4)
    running: dict[int, str] = {}
    sys.stdout.flush()
    while requests or running:
        while requests and len(running) < parallel:
            request = requests.pop(0)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(request)
                finally:
                    os._exit(code)
            running[pid] = request["id"]
        pid, status = os.wait()
        print(json.dumps({"id": running.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
