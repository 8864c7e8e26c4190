"""Speaker: non-blocking, newest-wins speech through a real subprocess."""
import logging
import shutil
import sys
import time
from pathlib import Path

import pytest

from flmm_ros.speech import DEFAULT_COMMAND, Speaker

# A stand-in for espeak-ng: appends the text from stdin as one line to argv[1], then "speaks" for a while.
FAKE_TTS = "import sys, time; text = sys.stdin.read(); open(sys.argv[1], 'a').write(text + '\\n'); time.sleep(float(sys.argv[2]))"


def fake_command(path, seconds):
    return [sys.executable, "-c", FAKE_TTS, str(path), str(seconds)]


def wait_for_lines(path: Path, count: int, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"expected {count} spoken lines in {path}, got {lines}")


def test_speak_returns_at_once_and_the_text_arrives_verbatim(tmp_path):
    spoken = tmp_path / "spoken.txt"
    text = "-v en; $(touch hacked) the red mug is on the left."
    with Speaker(fake_command(spoken, 1.0)) as speaker:
        assert speaker.available
        assert speaker.speak(text)
        assert not speaker.wait(timeout=0)  # speak returned while the utterance (over a second) still runs
        assert wait_for_lines(spoken, 1) == [text]
        assert speaker.wait(timeout=15.0)
    assert not (Path.cwd() / "hacked").exists()


def test_newest_utterance_wins_while_one_is_spoken(tmp_path):
    spoken = tmp_path / "spoken.txt"
    with Speaker(fake_command(spoken, 1.0)) as speaker:
        speaker.speak("first")
        wait_for_lines(spoken, 1)  # "first" is being spoken now
        for text in ("second", "third", "fourth"):
            assert speaker.speak(text)
        assert speaker.wait(timeout=15.0)
    assert spoken.read_text().splitlines() == ["first", "fourth"]


def test_max_pending_keeps_the_newest_few(tmp_path):
    spoken = tmp_path / "spoken.txt"
    with Speaker(fake_command(spoken, 1.0), max_pending=2) as speaker:
        speaker.speak("first")
        wait_for_lines(spoken, 1)
        for text in ("second", "third", "fourth"):
            speaker.speak(text)
        assert speaker.wait(timeout=15.0)
    assert spoken.read_text().splitlines() == ["first", "third", "fourth"]


def test_missing_program_warns_once_and_speaks_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="flmm_ros.speech"):
        speaker = Speaker(["flmm-no-such-speech-program"])
        assert not speaker.available
        assert not speaker.speak("hello")
        assert not speaker.speak("hello again")
        assert speaker.wait(timeout=0.1)
        speaker.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "flmm-no-such-speech-program" in warnings[0].getMessage()
    assert "espeak-ng" in warnings[0].getMessage()


def test_close_stops_a_long_utterance_quickly(tmp_path):
    spoken = tmp_path / "spoken.txt"
    speaker = Speaker(fake_command(spoken, 60))
    speaker.speak("a very long answer")
    wait_for_lines(spoken, 1)
    speaker.close()       # the utterance would take 60 s: close must stop it, not wait for it
    assert not speaker._thread.is_alive()
    assert not speaker.available and not speaker.speak("too late")


def test_failing_program_is_logged_and_later_text_still_spoken(tmp_path, caplog):
    spoken = tmp_path / "spoken.txt"
    script = ("import sys; text = sys.stdin.read(); "
              "sys.exit('no audio device') if text == 'fail' else open(sys.argv[1], 'a').write(text + '\\n')")
    with caplog.at_level(logging.WARNING, logger="flmm_ros.speech"):
        with Speaker([sys.executable, "-c", script, str(spoken)]) as speaker:
            speaker.speak("fail")
            assert speaker.wait(timeout=15.0)
            speaker.speak("works")
            assert speaker.wait(timeout=15.0)
    assert spoken.read_text().splitlines() == ["works"]
    assert any("exit 1" in r.getMessage() and "no audio device" in r.getMessage() for r in caplog.records)


def test_empty_text_is_not_spoken(tmp_path):
    with Speaker(fake_command(tmp_path / "spoken.txt", 0)) as speaker:
        assert not speaker.speak("   ")
    assert not (tmp_path / "spoken.txt").exists()


@pytest.mark.skipif(shutil.which(DEFAULT_COMMAND[0]) is None, reason="espeak-ng is not installed")
def test_real_espeak_ng_writes_speech_audio(tmp_path):
    wav = tmp_path / "answer.wav"
    with Speaker([*DEFAULT_COMMAND, "-w", str(wav)]) as speaker:
        assert speaker.speak("The red mug is on the left.")
        assert speaker.wait(timeout=30.0)
    data = wav.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    assert len(data) > 20000  # about a second of 22 kHz 16-bit audio, not an empty header
