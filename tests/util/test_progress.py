"""Progress where stderr is not a terminal: plain lines at most every LOG_EVERY_S seconds, none for short work."""

from qtc.util import progress


def test_a_log_gets_a_plain_line_with_position_and_eta_once_work_runs_long(monkeypatch, capsys):
    clock = iter([0.0, 0.0, 5.0, 31.0, 40.0, 62.0])  # start, last, then one reading per advance
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.progress_bar("layer statistics", total=10) as advance:
        advance("segment 1/3")
        advance()
        advance("segment 2/3")
        advance()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["layer statistics segment 1/3: 2/10, 0:00:31 elapsed, ETA 0:02:04",
                     "layer statistics segment 2/3: 4/10, 0:01:02 elapsed, ETA 0:01:33"]


def test_quiet_and_short_work_print_nothing(capsys):
    with progress.progress_bar("x", total=3, quiet=True) as advance:
        advance()
    with progress.progress_bar("y", total=3) as advance:
        advance()
    assert capsys.readouterr().err == ""
