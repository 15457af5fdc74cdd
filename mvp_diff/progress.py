"""Progress that fits where it goes: a tqdm bar in a terminal; in a log file or CI (stderr not a
terminal) one plain line every `LOG_EVERY` of the way and one at the end, instead of thousands of
carriage-return updates."""

import sys
import time

LOG_EVERY = 0.1  # share of the total between two lines when stderr is not a terminal


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """The part of tqdm's interface this project uses (iteration, update, set_postfix, close, `n`),
    printing whole lines."""

    def __init__(self, iterable=None, total=None, desc="", initial=0, file=None, every=LOG_EVERY):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.n = total, desc, initial
        self.file = file or sys.stderr
        self.every = every
        self.postfix = ""
        self.started = time.monotonic()
        self.next_share = (int(initial / total / every) + 1) * every if total else None
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        values = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc=None, refresh=True):
        self.desc = desc or ""

    def refresh(self):
        pass

    def _line(self):
        done = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done} in {time.monotonic() - self.started:.0f} s{extra}"

    def update(self, n=1):
        self.n += n
        if self.total and self.next_share is not None and self.n < self.total and self.n / self.total >= self.next_share - 1e-12:
            print(self._line(), file=self.file, flush=True)
            while self.n / self.total >= self.next_share - 1e-12:
                self.next_share += self.every

    def close(self):
        if not self.closed:
            self.closed = True
            print(self._line() + " done" if self.total is None or self.n >= self.total else self._line(), file=self.file, flush=True)


class _Silent(LineProgress):
    def update(self, n=1):
        self.n += n

    def close(self):
        self.closed = True


def progress_bar(iterable=None, total=None, desc="", disable=False, initial=0, terminal=None, **tqdm_kwargs):
    """A tqdm bar when stderr is a terminal (`terminal` overrides the check), else a `LineProgress`;
    nothing at all with `disable`."""
    if disable:
        return _Silent(iterable, total, desc, initial)
    if terminal if terminal is not None else _is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, **{"leave": False, **tqdm_kwargs})
    return LineProgress(iterable, total, desc, initial)
