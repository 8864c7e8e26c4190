"""Spoken answers through espeak-ng, off the caller's thread (no ROS)."""
from __future__ import annotations

import collections
import logging
import shutil
import subprocess
import threading
from typing import Sequence

logger = logging.getLogger(__name__)

# Text goes to stdin, so an answer is never parsed as options or by a shell.
DEFAULT_COMMAND = ("espeak-ng", "--stdin")


class Speaker:
    """Speaks text with a text-to-speech command in a background thread.

    `speak(text)` returns at once. At most `max_pending` utterances wait while one is spoken; when more
    arrive the oldest waiting one is dropped, so a robot never reads out a backlog of stale answers.
    `command` (default espeak-ng) is run once per utterance with the text on its stdin. When its program
    is not installed, the speaker logs one warning and `speak` does nothing.
    """

    def __init__(self, command: Sequence[str] | None = None, *, max_pending: int = 1, timeout_s: float = 60.0):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.command = list(command or DEFAULT_COMMAND)
        self.timeout_s = timeout_s
        self._available = shutil.which(self.command[0]) is not None
        self._pending: collections.deque[str] = collections.deque(maxlen=max_pending)
        self._condition = threading.Condition()
        self._process: subprocess.Popen | None = None
        self._closed = False
        self._thread = None
        if not self._available:
            logger.warning("'%s' is not installed, so answers will not be spoken (Debian/Ubuntu: "
                           "apt-get install espeak-ng)", self.command[0])
            return
        self._thread = threading.Thread(target=self._run, name="flmm-speaker", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        """True when the speech program is installed (and the speaker not closed)."""
        return self._available and not self._closed

    def speak(self, text: str) -> bool:
        """Queue `text` to be spoken; never blocks. Returns False when nothing will be spoken."""
        text = text.strip()
        if not text or not self.available:
            return False
        with self._condition:
            self._pending.append(text)  # a full deque drops its oldest entry: newest wins
            self._condition.notify_all()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything queued has been spoken; False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending and self._process is None, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Drop waiting utterances, stop the one being spoken and end the thread."""
        with self._condition:
            self._closed = True
            self._pending.clear()
            if self._process is not None:
                self._process.terminate()
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Speaker":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                text = self._pending.popleft()
                # Started under the lock so close() always sees (and can stop) the running process.
                try:
                    self._process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.PIPE, text=True)
                except OSError as error:
                    logger.warning("could not run %s: %s", self.command[0], error)
                    self._condition.notify_all()
                    continue
                process = self._process
            self._finish(process, text)
            with self._condition:
                self._process = None
                self._condition.notify_all()

    def _finish(self, process: subprocess.Popen, text: str) -> None:
        try:
            _, stderr = process.communicate(text, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            logger.warning("%s took longer than %.0f s and was stopped", self.command[0], self.timeout_s)
            return
        if process.returncode != 0 and not self._closed:
            logger.warning("%s failed (exit %d): %s", self.command[0], process.returncode, (stderr or "").strip()[-300:])
