"""``WORKDIR/metrics.jsonl`` and TensorBoard across a resume (``dpt_jax.metrics``)."""
import json
import os
import struct

import pytest

from dpt_jax.metrics import MetricWriter, read_metrics


def _session_starts(folder):
    """Steps of the TensorBoard events that open a session (where a resume purges from)."""
    from tensorboardX.proto.event_pb2 import Event
    starts = []
    for name in sorted(os.listdir(folder)):
        data, i = open(os.path.join(folder, name), "rb").read(), 0
        while i < len(data):  # TFRecord: length, its crc, the event, its crc
            (size,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + size])
            if event.HasField("session_log"):
                starts.append(event.step)
            i += 16 + size
    return starts


def test_a_resume_keeps_each_step_once_past_a_cut_off_last_line(tmp_path, caplog):
    writer = MetricWriter(str(tmp_path))
    for step in range(1, 5):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the run was killed mid-write
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    assert "cut off mid-write" in caplog.text
    writer = MetricWriter(str(tmp_path), resume_step=2)  # the checkpoint of step 2 resumes
    writer.write(3, {"loss": 30.0})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")
    # TensorBoard hides the first session's steps 3 and 4 (its files keep them): the resumed
    # session starts at step 3.
    assert _session_starts(str(tmp_path / "tensorboard"))[-1] == 3


def test_a_bad_row_is_named_by_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n{oops\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON row"):
        read_metrics(str(tmp_path))
