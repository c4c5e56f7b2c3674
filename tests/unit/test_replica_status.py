"""The replica's report of a result (``worker/replica.py`` ``_status_of``): never a large stream message."""

from flytekitplugins.actor.protocol import lease_pb2
from flytekitplugins.actor.worker.replica import MAX_STATUS_MESSAGE_CHARS, _status_of


def test_large_outputs_are_reported_by_size_only():
    status = _status_of("l1", {"phase": "succeeded", "outputs_in_prefix": True, "outputs_size": 70 << 20})
    assert (status.phase, status.outputs, status.outputs_in_prefix, status.outputs_size) == (
        lease_pb2.SUCCEEDED, b"", True, 70 << 20)


def test_small_outputs_travel_inline_with_their_size():
    status = _status_of("l1", {"phase": "succeeded", "outputs": b"abc", "outputs_size": 3})
    assert (status.outputs, status.outputs_in_prefix, status.outputs_size) == (b"abc", False, 3)


def test_a_huge_error_is_cut_so_the_report_stays_small():
    status = _status_of("l1", {"phase": "failed", "message": "x" * (10 << 20), "error": b"e" * (5 << 20),
                               "retryable": True, "system_error": True})
    assert status.phase == lease_pb2.FAILED and status.retryable and status.system_error
    assert len(status.message) < MAX_STATUS_MESSAGE_CHARS + 100 and "cut" in status.message
    assert status.error == b"" and status.ByteSize() < 100 * 1024


def test_the_executor_reads_small_outputs_and_only_sizes_large_ones(tmp_path):
    from flytekitplugins.actor.protocol import INLINE_OUTPUT_BYTES
    from flytekitplugins.actor.worker.executor import _result_from

    (tmp_path / "outputs.pb").write_bytes(b"s" * 10)
    assert _result_from(str(tmp_path), "t") == {"phase": "succeeded", "outputs": b"s" * 10, "outputs_size": 10,
                                               "message": "t succeeded"}
    (tmp_path / "outputs.pb").write_bytes(b"L" * (INLINE_OUTPUT_BYTES + 1))
    result = _result_from(str(tmp_path), "t")
    assert (result["outputs"], result["outputs_in_prefix"], result["outputs_size"]) == (
        b"", True, INLINE_OUTPUT_BYTES + 1)


def test_the_replica_log_line_is_loggings_own_with_the_time_formatted_once_a_second():
    import logging

    from flytekitplugins.actor.worker.replica import _Formatter

    fmt = "%(asctime)s %(name)s %(message)s"
    ours, loggings = _Formatter(fmt), logging.Formatter(fmt)
    for created in (1_780_000_000.125, 1_780_000_000.987, 1_780_000_001.004, 1_780_000_000.5):
        record = logging.LogRecord("flyte-actor-replica", logging.INFO, __file__, 1, "task start: %s", ("k",), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == loggings.format(record)
