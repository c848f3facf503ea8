"""Reads a TensorBoard log directory with the tensorboard package, the test oracle of moeforge's
event files (launch/train/tensorboard.h). Prints one JSON line:

  {"records": N, "files": F, "scalars": {tag: [[step, value], ...]}}

Every record of every event file is first read by TensorBoard's own record reader, which checks
both CRC-32C checksums of each record (a bad one raises DataLossError and fails the oracle); the
scalars then come from TensorBoard's EventAccumulator, as TensorBoard shows them (a session start
purges later steps of an interrupted run).
"""
import glob
import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow


def main():
    log_dir = sys.argv[1]
    files = sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))
    records = 0
    for path in files:
        reader = pywrap_tensorflow.PyRecordReader_New(path)
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                break
            records += 1
    acc = event_accumulator.EventAccumulator(log_dir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    scalars = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    print(json.dumps({"records": records, "files": len(files), "scalars": scalars}))


if __name__ == "__main__":
    main()
