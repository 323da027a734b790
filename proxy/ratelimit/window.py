"""Window arithmetic of global limits: which window a time falls in, and what a subject has used.

Windows are aligned on the Unix epoch (window `n` covers [n * length, (n + 1) * length) seconds), so
every worker of every host agrees on them as far as their clocks agree. A fixed window counts the
requests of the current window; a sliding window (the two-window weighted estimate, as nginx and
Cloudflare do it) adds the previous window's count weighted by the part of it that still lies within
one window length of now: `used = previous * (1 - elapsed / length) + current`.
"""

from __future__ import annotations

import math


def window_of(wall: float, length: float) -> int:
    """The index of the window holding Unix time `wall`."""
    return math.floor(wall / length)


def elapsed_fraction(wall: float, length: float, window: int) -> float:
    """How much of window `window` has passed at `wall` (0.0 to 1.0)."""
    fraction = wall / length - window
    if fraction < 0.0:
        return 0.0
    return fraction if fraction < 1.0 else 1.0


def used(previous: int, current: int, fraction: float, sliding: bool) -> float:
    """Requests counted against the limit: the current window's, plus the weighted previous one when sliding."""
    if sliding:
        return previous * (1.0 - fraction) + current
    return float(current)


def reset_after(wall: float, length: float, window: int) -> float:
    """Seconds from `wall` until window `window` ends."""
    left = (window + 1) * length - wall
    return left if left > 0.0 else 0.0


def retry_after(
    limit: int, previous: int, current: int, wall: float, length: float, window: int, sliding: bool
) -> float:
    """Seconds from `wall` until one more request fits under `limit`: the end of the window for a fixed
    window (or a current count already at the limit), else when enough of the previous window has slid out."""
    end = reset_after(wall, length, window)
    if not sliding or current + 1 > limit or previous <= 0:
        return end
    # previous * (1 - f) + current + 1 <= limit  <=>  f >= 1 - (limit - current - 1) / previous
    needed = 1.0 - (limit - current - 1) / previous
    wait = (needed - elapsed_fraction(wall, length, window)) * length
    if wait < 0.0:
        return 0.0
    return wait if wait < end else end
