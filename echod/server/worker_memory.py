"""``max_worker_memory``: each worker's own check of its unique memory (USS)."""

from __future__ import annotations

from collections.abc import Callable

MEMORY_SAMPLE_INTERVAL = 3.0  # seconds between samples of our own USS for max_worker_memory


class MemoryLimit:
    """``max_worker_memory``: is this worker's unique memory (USS) over the limit?

    Reading USS parses /proc/self/smaps (about a millisecond), so housekeeping
    asks every ``MEMORY_SAMPLE_INTERVAL``, the first time that long after start;
    never per connection or per event. ``sample`` returns our USS in bytes (see
    :func:`own_uss_sampler`) or raises OSError.
    """

    def __init__(self, limit: int, sample: Callable[[], int], now: float) -> None:
        self.limit = limit
        self.sample = sample
        self.next_sample = now + MEMORY_SAMPLE_INTERVAL

    def exceeded(self, now: float) -> int:
        """If a sample is due and above the limit, that sample (bytes); else 0."""
        if now < self.next_sample:
            return 0
        self.next_sample = now + MEMORY_SAMPLE_INTERVAL
        uss = self.sample()
        return uss if uss > self.limit else 0


def own_uss_sampler() -> Callable[[], int]:
    """This process's USS through psutil, with the Process object made once."""
    # Imported here, in the worker that samples: the master imports the worker's modules.
    import psutil

    process = psutil.Process()

    def sample() -> int:
        try:
            return int(process.memory_full_info().uss)
        except psutil.Error as exc:
            raise OSError(str(exc) or type(exc).__name__) from exc

    return sample
