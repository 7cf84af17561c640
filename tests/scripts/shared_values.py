"""Under `accelerate launch` with 2 processes: what distributed.computed_on_main and same_on_every_process do.

Usage: accelerate launch ... tests/scripts/shared_values.py RECORD_DIR
Writes RECORD_DIR/rank{R}.json: the value each rank got from computed_on_main (only the main process computes),
the error each rank got from same_on_every_process for a value that differs by rank (every rank must raise), and
what each rank got when the main process's computation raised, and whether it then left the process group.
"""

import json
import os
import sys

import torch.distributed
from accelerate import PartialState

from smpo_diffusers.distributed import (
    computed_on_main, leave_process_group, same_on_every_process, use_cpu_process_group)


def main():
    state = PartialState(cpu=use_cpu_process_group())
    calls = []

    def compute():
        calls.append(state.process_index)
        return {"computed_by": state.process_index, "stems": [f"{row}-abc" for row in range(3)]}

    shared = computed_on_main(compute, state)
    same_on_every_process("same", state, "a value every rank shares")  # no error
    try:
        same_on_every_process(f"rank-{state.process_index}", state, "a per-rank value")
        error = None
    except ValueError as caught:
        error = str(caught)

    def broken():
        raise OSError("disk gone")

    try:
        computed_on_main(broken, state)
        failure = None
    except (OSError, RuntimeError) as caught:
        failure = f"{type(caught).__name__}: {caught}"
    leave_process_group()
    os.makedirs(sys.argv[1], exist_ok=True)
    with open(os.path.join(sys.argv[1], f"rank{state.process_index}.json"), "w") as handle:
        json.dump({"rank": state.process_index, "shared": shared, "calls": calls, "error": error,
                   "failure": failure, "left_group": not torch.distributed.is_initialized()}, handle)


if __name__ == "__main__":
    main()
