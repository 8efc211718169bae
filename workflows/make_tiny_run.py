"""Generate a real tiny RLVR run (warm start + GRPO) with HF checkpoints.

Same as ``rlvr-lin make-tiny-run``; kept here so cluster users can submit it
as a plain script. Example:

    python workflows/make_tiny_run.py runs/tiny --dtype bfloat16 --max-shard-size 200KB
"""

from pipeline.cli import app

if __name__ == "__main__":
    import sys

    app(["make-tiny-run", *sys.argv[1:]], prog_name="make_tiny_run.py")
