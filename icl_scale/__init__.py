"""icl_scale: does in-context learning behave like finetuning? The whole study as one job."""

import logging

# a library logs to the handlers its caller sets (each rank's file, runtime/progress.py), never to stderr
logging.getLogger("icl_scale").addHandler(logging.NullHandler())
