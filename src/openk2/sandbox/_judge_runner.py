"""Runs inside the sandbox (standard library only, any Python >= 3.9): compile once, then run the solution on each
test input in a child process of its own with a per-test time and memory limit, and print one JSON line per test.

The expected outputs never enter the sandbox: the host compares, so a solution cannot read the answers. Each
child's stdout is a file, not this script's stdout, so a solution cannot forge result lines either.
"""

import contextlib
import io
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import time
import traceback

with open("judge_spec.json", encoding="utf-8") as spec_file:
    SPEC = json.load(spec_file)
RESULTS = sys.stdout


def emit(record):
    RESULTS.write(json.dumps(record) + "\n")
    RESULTS.flush()


def read_capped(path, limit):
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def wait_with_timeout(pid, timeout_s):
    """(status, timed_out, seconds) for child `pid`."""
    start = time.monotonic()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        exited = bool(poller.poll(timeout_s * 1000))
        os.close(pidfd)
    else:
        exited = False
        while time.monotonic() - start < timeout_s:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status, False, time.monotonic() - start
            time.sleep(0.002)
    if not exited:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status, not exited, time.monotonic() - start


def run_child(index, code):
    """In the forked child: wire stdin/stdout/stderr to files, apply the per-test limits, run the solution."""
    os.setpgid(0, 0)
    cpu = int(math.ceil(SPEC["timeout_s"])) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    if SPEC.get("memory_mb"):
        limit = SPEC["memory_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.dup2(os.open(f"tests/{index}.in", os.O_RDONLY), 0)
    os.dup2(os.open("out.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
    os.dup2(os.open("err.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
    if SPEC["language"] == "exec":
        os.execv(SPEC["binary"], [SPEC["binary"]])
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8")
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8")
    exit_code = 0
    try:
        scope = {"__name__": "__main__", "__builtins__": __builtins__}
        if SPEC["mode"] == "call":
            scope["__name__"] = "solution"  # a call-based solution's test code under __main__ must not run
        exec(code, scope)
        if SPEC["mode"] == "call":
            name = SPEC["func_name"]
            target = scope["Solution"]() if "Solution" in scope else None
            function = getattr(target, name) if target is not None and hasattr(target, name) else scope[name]
            args = [json.loads(line) for line in sys.stdin.read().split("\n") if line.strip()]
            result = function(*args)
            if isinstance(result, tuple):
                result = list(result)
            with open("result.json", "w") as f:
                f.write(json.dumps(result))
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        exit_code = 1
    # sys.__stdout__ is this script's own stream object, but fd 1 is now the test's output file: flush it too.
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            exit_code = exit_code or 1
    os._exit(exit_code)


def main():
    emit({"started": True})  # no solution code has run yet: without this line the host knows the runner failed
    if SPEC.get("compile"):
        try:
            proc = subprocess.run(SPEC["compile"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=SPEC.get("compile_timeout_s", 60))
        except subprocess.TimeoutExpired:
            emit({"compile_error": "compiler timed out"})
            return
        if proc.returncode != 0:
            emit({"compile_error": proc.stdout.decode("utf-8", errors="replace")[-4000:]})
            return
    code = None
    if SPEC["language"] == "python":
        try:
            with open(SPEC["source"], encoding="utf-8") as f:
                code = compile(f.read(), SPEC["source"], "exec")
        except (SyntaxError, ValueError) as exc:
            emit({"compile_error": f"{type(exc).__name__}: {exc}"})
            return
    cap = SPEC.get("output_cap", 1 << 24)
    for index in range(SPEC["n_tests"]):
        for stale in ("out.txt", "err.txt", "result.json"):
            if os.path.exists(stale):
                os.unlink(stale)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                run_child(index, code)
            finally:
                os._exit(1)
        status, timed_out, seconds = wait_with_timeout(pid, SPEC["timeout_s"])
        record = {"i": index, "time": round(seconds, 4)}
        if timed_out:
            record["status"] = "timeout"
        elif os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            record["status"] = "timeout" if number in (signal.SIGXCPU, signal.SIGKILL) else "runtime-error"
            record["signal"] = number
        elif os.WEXITSTATUS(status) != 0:
            record["status"] = "runtime-error"
            record["exit"] = os.WEXITSTATUS(status)
        else:
            record["status"] = "ok"
        result_file = "result.json" if SPEC["mode"] == "call" else "out.txt"
        if record["status"] == "ok":
            if os.path.exists(result_file):
                record["output"], record["output_truncated"] = read_capped(result_file, cap)
            else:
                record["status"], record["error"] = "runtime-error", "no result"
        if record["status"] != "ok" and os.path.exists("err.txt"):
            record["stderr"] = read_capped("err.txt", 2000)[0]
        emit(record)
        if record["status"] != "ok" and SPEC.get("stop_on_failure", True):
            return


main()
