"""One of 2 processes (RANK/WORLD_SIZE/MASTER_* from the environment, as torchrun sets them) on a CPU machine: the
main process works alone for SECONDS while the other waits for it, in a process group made with
``process_state(TIMEOUT)`` (what ``--ddp_timeout`` sets). Writes RECORD_DIR/rank{R}.json: ``{"ended": the value
computed, or the exception the process ended with}``.

Usage: python tests/scripts/slow_main_process.py RECORD_DIR TIMEOUT SECONDS
"""

import json
import pathlib
import sys
import time

from smpo_diffusers.distributed import computed_on_main, leave_process_group, process_state

record_dir, timeout, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
state = process_state(timeout)
try:
    ended = computed_on_main(lambda: time.sleep(seconds) or "computed", state, "work alone")
    failed = False
except Exception as error:  # noqa: BLE001 - recorded for the test to read
    ended, failed = f"{type(error).__name__}: {error}", True
(record_dir / f"rank{state.process_index}.json").write_text(json.dumps({"ended": ended}))
leave_process_group(wait=not failed)
