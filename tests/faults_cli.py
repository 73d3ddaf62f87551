"""Many `mamlbench` command lines in one real subprocess: each runs `mamlbench.cli.main` as the console
script does (argv, its own stdout/stderr, SystemExit), so a test of twenty mistakes pays the imports once.

    python tests/faults_cli.py cases.json results.json
cases: [{"name", "argv", "env"?}]; results: {name: {"rc", "stdout", "stderr", "seconds"}}.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time


def run(case: dict) -> dict:
    from mamlbench.cli import main
    saved = dict(os.environ)
    os.environ.update(case.get("env", {}))
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["mamlbench", *case["argv"]]
    started = time.perf_counter()
    rc = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException as exc:  # a traceback is what the cases must never produce: report it as one
        import traceback
        err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(exc)))
        rc = 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue(), "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    cases_path, results_path = sys.argv[1:3]   # each case rewrites sys.argv
    cases = json.loads(open(cases_path).read())
    results = {}
    for case in cases:
        results[case["name"]] = run(case)
        print(f"{case['name']}: rc {results[case['name']]['rc']}, {results[case['name']]['seconds']:.1f} s",
              file=sys.stderr, flush=True)
    with open(results_path, "w") as f:
        json.dump(results, f)
