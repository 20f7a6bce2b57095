import logging
import os
import sys

from quantizer.cli import main

# vLLM starts its engine with `spawn`, which re-imports the main module: only run the CLI once.
if __name__ == "__main__":
    code = main()
    # The result is written by now: skip the interpreter's teardown, which can crash in the native
    # libraries an engine leaves threads in. Seen on the real node: the evaluator wrote a Passed verdict,
    # then died of SIGSEGV (exit 139) at exit on vLLM's CPU backend, so the Job ran the gate again.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
