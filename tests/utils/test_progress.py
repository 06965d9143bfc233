"""Progress bars report in logs too: throttled, not hidden, when stderr is not a terminal."""

import io

from difffeat.utils.progress import LOG_INTERVAL_S, progress


def test_a_log_file_gets_a_throttled_bar_and_the_final_count(monkeypatch):
    log = io.StringIO()  # not a terminal, like a batch job's redirected stderr
    monkeypatch.setattr("sys.stderr", log)
    bar = progress(range(5), desc="extract", file=log)
    assert not bar.disable and bar.mininterval == LOG_INTERVAL_S
    assert list(bar) == list(range(5))
    bar.close()
    assert "extract" in log.getvalue() and "5/5" in log.getvalue()


def test_it_can_be_switched_off():
    assert progress(range(3), enabled=False).disable
